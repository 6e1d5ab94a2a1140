"""Frozen snapshots of swarm state: what the topology view is drawn from.

Whoever owns the live objects (a source, a local swarm) copies what it knows into
these at one instant; the view never reads live objects, so a refresh can never
race the event loop that mutates them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PeerState:
    """One peer as last announced and measured."""

    name: str
    mem_used: int  # bytes held by the shards this peer serves now
    mem_usable: int  # bytes it offered to the swarm
    decode_ms: float | None = None  # measured time of one decode step through ALL units, ms
    alive: bool = True
    last_seen_s: float | None = None  # seconds since the last heartbeat
    address: str = ""
    threads: int | None = None


@dataclass(frozen=True)
class LinkState:
    """A measured link between two peers (symmetric unless both directions are given)."""

    a: str
    b: str
    bandwidth_bps: float | None  # bytes per second
    rtt_s: float | None


@dataclass(frozen=True)
class StageState:
    """One pipeline stage of the current plan: a peer serving units [start, end)."""

    peer: str
    start: int
    end: int
    busy_share: float | None = None  # fraction of wall time spent computing, 0..1
    tokens_per_s: float | None = None
    in_flight: int | None = None  # micro-batches queued or running at this stage
    step_ms: float | None = None  # mean time of one step on this stage


@dataclass(frozen=True)
class PlanState:
    """The model's units laid out across the peers, in pipeline order."""

    model: str
    num_units: int
    stages: tuple[StageState, ...]
    objective: str = ""  # "latency" / "throughput"
    predicted_ms_per_token: float | None = None


@dataclass(frozen=True)
class SwarmSnapshot:
    """Everything the topology view shows, taken at one instant."""

    peers: tuple[PeerState, ...] = ()
    links: tuple[LinkState, ...] = ()
    plan: PlanState | None = None
    source: str = ""  # the peer this view is running on
    tokens_per_s: float | None = None  # whole-pipeline generation rate
    micro_batches: int | None = None  # micro-batches in flight in the whole pipeline
    notes: tuple[str, ...] = field(default=())  # problems a person can act on
    transfers: tuple[str, ...] = field(default=())  # "pi receiving weights: 12.0 MB / 40.0 MB at ..."


def unit_name(unit: int, num_units: int) -> str:
    """Human name of a unit: embedding, decoder block, or norm + head (see docs/architecture.md)."""
    if unit == 0:
        return "embed"
    if unit == num_units - 1:
        return "head"
    return f"block.{unit - 1}"
