"""A SwarmSnapshot from what a source knows: announcements, its plan, stage statistics.

Pure: the source copies its live state into a ``SourceState`` (swarm/source_state.py:
plain values and frozen announcements) on the event loop (``SwarmSource.state()``), and
this turns it into what the view draws. The source knows nothing of the view.
"""

from __future__ import annotations

from typing import Sequence

from swarm.sizes import describe_transfer
from swarm.source_state import SourceState
from swarm.view.snapshot import LinkState, PeerState, PlanState, StageState, SwarmSnapshot


def decode_ms(decode_us: Sequence[int], num_units: int, summarised: bool) -> float | None:
    """Measured time of one decode step through all units, from per-unit microseconds
    (or the (embed, median block, head) summary of a large announcement)."""
    if not decode_us:
        return None
    if summarised and len(decode_us) == 3:
        return (decode_us[0] + decode_us[1] * (num_units - 2) + decode_us[2]) / 1e3
    return sum(decode_us) / 1e3


def snapshot_from_source(state: SourceState) -> SwarmSnapshot:
    units = state.source_profile.get("units", [])
    num_units = len(units)
    names = {state.source_id: state.source_name}
    names.update({pid: a.name for pid, a in state.announcements.items()})

    used: dict[str, float] = {}
    plan_state = None
    if state.problem is not None and state.plan is not None:
        ids = list(state.problem["peer_ids"])
        for pid, name in zip(ids, (d["name"] for d in state.problem["devices"])):
            names.setdefault(pid, name)
        stages = []
        for k, stage in enumerate(state.plan.stages):
            pid = ids[stage.device]
            used[pid] = used.get(pid, 0.0) + state.plan.mem_used[k]
            stat = state.stats[k] if k < len(state.stats) else None
            stages.append(StageState(
                names[pid], stage.start, stage.end,
                busy_share=None if stat is None else stat.busy_share,
                tokens_per_s=None if stat is None else stat.tokens_per_s,
                in_flight=None if stat is None else stat.queued,
                step_ms=None if stat is None or not stat.steps_per_s else 1e3 * stat.busy_share / stat.steps_per_s,
            ))
        plan_state = PlanState(state.model, num_units, tuple(stages), objective=state.plan.objective,
                               predicted_ms_per_token=1e3 * state.plan.latency_s)

    own_decode = sum(float(u.get("decode_s", 0.0)) for u in units) * 1e3 or None
    peers = [PeerState(state.source_name, int(used.get(state.source_id, 0)), state.source_mem,
                       decode_ms=own_decode, threads=state.source_profile.get("device", {}).get("threads"),
                       last_seen_s=0.0)]
    for pid, a in sorted(state.announcements.items(), key=lambda item: item[1].name):
        peers.append(PeerState(a.name, int(used.get(pid, 0)), a.mem_bytes,
                               decode_ms=decode_ms(a.decode_us, a.num_units, a.summarised), threads=a.threads))
    planned_but_gone = [pid for pid in used if pid != state.source_id and pid not in state.announcements]
    peers += [PeerState(names[pid], 0, 0, alive=False) for pid in planned_but_gone]

    links: dict[frozenset[str], LinkState] = {}
    measured = [(state.source_id, pid, link) for pid, link in state.source_links.items()]
    measured += [(pid, other, link) for pid, a in state.announcements.items() for other, link in a.links.items()]
    for a, b, link in measured:
        if a in names and b in names and a != b:
            links.setdefault(frozenset((a, b)), LinkState(names[a], names[b], link.bandwidth, link.rtt))

    return SwarmSnapshot(
        peers=tuple(peers), links=tuple(links.values()), plan=plan_state, source=state.source_name,
        tokens_per_s=state.tokens_per_s, micro_batches=state.micro_batches,
        notes=state.notes + tuple(f"peer {names[pid]} was lost; re-planning without it"
                                  for pid in planned_but_gone),
        transfers=tuple(f"{name} receiving weights: {describe_transfer(t['done'], t['total'], t['rate_bps'])}"
                        for name, t in sorted(state.transfers.items())))
