"""What a SwarmSource knows at one instant: ``SwarmSource.state()``, for views to read.

Plain values and frozen announcements, no torch and no zmq: the views (swarm/view),
the HTTP API's /v1/swarm and the CLI read it without the runtime, and the source
imports nothing of theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class SourceState:
    """Everything a snapshot needs, copied from a SwarmSource at one instant.

    announcements: peer id -> swarm.discovery.txt.Announcement of each live peer
    source_links: peer id -> Link this source measured towards that peer
    problem / plan: the current SourcePlan's problem JSON and planner Plan (or None)
    stats: the pipeline's StageStats, in stage order (or empty)
    transfers: peer name -> the weights it is receiving while a plan loads (done, total, rate_bps)
    """

    source_id: str
    source_name: str
    source_profile: Mapping[str, Any]
    source_mem: int
    announcements: Mapping[str, Any] = field(default_factory=dict)
    source_links: Mapping[str, Any] = field(default_factory=dict)
    problem: Mapping[str, Any] | None = None
    plan: Any = None
    stats: Sequence[Any] = ()
    micro_batches: int | None = None
    tokens_per_s: float | None = None
    model: str = ""
    notes: tuple[str, ...] = ()
    recoveries: tuple[Any, ...] = ()  # swarm.runtime.recovery.RecoveryEvent, oldest first
    deployed: bool = False
    recovering: bool = False
    diagnostic: str = ""  # what discovery tried and heard (for "no peers found")
    links_measured: int = 0  # links from the source measured so far
    peer_ids: frozenset[str] = frozenset()  # the peers the current plan was made over
    transfers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
