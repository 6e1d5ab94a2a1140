"""GET /v1/swarm: the live view's data (peers, links, plan, per-stage load) as JSON.

Built from the same snapshot the terminal views draw (swarm.view.from_source), so
the HTTP API and `swarm top` never disagree. ``source_state`` is the one place that
reads the live source; it becomes ``source.state()`` once the source publishes one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from swarm.view.from_source import SourceState, snapshot_from_source
from swarm.view.snapshot import SwarmSnapshot


def source_state(source: Any, model: str, stats: Sequence[Any], tokens_per_s: float | None,
                 notes: tuple[str, ...] = ()) -> SourceState:
    """Copy what a SwarmSource knows, at one instant on the event loop."""
    current = source.current
    profile = source.profile or {}
    return SourceState(
        source_id=source.peer_id, source_name=source.config.name, source_profile=profile,
        source_mem=source.config.mem_bytes or profile.get("device", {}).get("mem_bytes", 0),
        announcements={pid: rec.announcement for pid, rec in (source.directory.live if source.directory else {}).items()},
        source_links=dict(source.prober.links) if source.prober else {},
        problem=current.problem if current else None, plan=current.plan if current else None,
        stats=tuple(stats), tokens_per_s=tokens_per_s, model=model, notes=notes)


def snapshot_json(snapshot: SwarmSnapshot, requests: dict[str, int]) -> dict:
    """The snapshot as plain JSON, plus the server's own request counts."""
    body = dataclasses.asdict(snapshot)
    body["requests"] = dict(requests)
    return body
