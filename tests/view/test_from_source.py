"""The topology view built from what a source knows: announcements, its plan, stage stats."""

from __future__ import annotations

from swarm.discovery.problem import Device, Workload, build_problem, links_from_announcements
from swarm.discovery.txt import Announcement, Link
from swarm.planner.api import plan as plan_problem
from swarm.planner.problem import Problem
from swarm.runtime.stats import StageStats
from swarm.source_state import SourceState
from swarm.view.from_source import decode_ms, snapshot_from_source
from swarm.view.render import topology

from tests.helpers.render import cells, render_text

MIB = 1 << 20
N = 6  # embed, 4 blocks, head
UNITS = [{"name": n, "weight_bytes": w * MIB, "kv_bytes_per_token": 0, "out_bytes_per_token": 256,
          "prefill_s": 0.002, "decode_s": 0.001, "time_s": 0.0015}
         for n, w in zip(["embed", "block.0", "block.1", "block.2", "block.3", "head"], [40, 30, 30, 30, 30, 40])]
PROFILE = {"device": {"name": "box", "threads": 1, "mem_bytes": 45 * MIB}, "units": UNITS,
           "model": {"fingerprint": "f" * 64, "num_units": N}}


def announcement(peer_id: str, name: str, mem_mib: int, links: dict[str, Link]) -> Announcement:
    return Announcement(peer_id=peer_id, name=name, fingerprint="ffff", mem_bytes=mem_mib * MIB, threads=2,
                        kind="cpu", prefill_us=(2000,) * N, decode_us=(1000,) * N, num_units=N, links=links)


PEERS = {
    "p1": announcement("p1", "desk", 100, {"p2": Link(bandwidth=12.5e6, rtt=0.003)}),  # 100 Mbit/s
    "p2": announcement("p2", "attic", 100, {}),
}
SOURCE_LINKS = {"p1": Link(bandwidth=125e6, rtt=0.0004), "p2": Link(bandwidth=2.5e6, rtt=0.012)}


def planned():
    devices = [Device("me", "laptop", 45 * MIB, (0.0015,) * N)]
    devices += [Device(pid, a.name, a.mem_bytes, tuple(a.unit_times())) for pid, a in sorted(PEERS.items())]
    links = links_from_announcements(list(PEERS.values()))
    links.update({("me", pid): link for pid, link in SOURCE_LINKS.items()})
    problem = build_problem(PROFILE, devices, links, Workload())
    return problem, plan_problem(Problem.from_json(problem), objective="latency")


def state(**overrides) -> SourceState:
    problem, plan = planned()
    base = dict(source_id="me", source_name="laptop", source_profile=PROFILE, source_mem=45 * MIB,
                announcements=PEERS, source_links=SOURCE_LINKS, problem=problem, plan=plan, model="tiny")
    return SourceState(**{**base, **overrides})


def test_peers_links_and_plan_come_from_the_source_state():
    problem, plan = planned()
    text = render_text(topology(snapshot_from_source(state())))
    rows = {cells(line)[0]: cells(line) for line in text.splitlines() if line.count("│") > 5 and "MiB" in line}
    # The source holds only the embedding (40 MiB of its 45); the model is split over the rest.
    assert rows["laptop (you)"][2] == "40.0 MiB / 45.0 MiB"
    assert [s.device for s in plan.stages][0] == 0 and len(plan.stages) >= 2
    used = {problem["devices"][s.device]["name"]: m for s, m in zip(plan.stages, plan.mem_used)}
    for name in ("desk", "attic"):
        expected = f"{used.get(name, 0) / MIB:.1f} MiB / 100.0 MiB" if name in used else "0 B / 100.0 MiB"
        assert rows[name][2] == expected
    assert rows["desk"][3] == "6.0 ms/token (2 thr)"
    link_rows = {cells(line)[0]: cells(line) for line in text.splitlines() if "↔" in line}
    assert link_rows["laptop ↔ desk"][1:] == ["1.0 Gbit/s", "0.40 ms"]
    assert link_rows["laptop ↔ attic"][1:] == ["20.0 Mbit/s", "12.00 ms"]
    assert link_rows["desk ↔ attic"][1:] == ["100.0 Mbit/s", "3.00 ms"]
    bar = next(line for line in text.splitlines() if "layers " in line).split("layers ")[1].split()[0]
    expected_bar = "".join(str(k + 1) * (s.end - s.start) for k, s in enumerate(plan.stages))
    assert bar == expected_bar


def test_stage_statistics_and_lost_peers():
    problem, plan = planned()
    stats = [StageStats(None, s.start, s.end, busy_share=0.25 * (k + 1), tokens_per_s=10.0 + k,
                        steps_per_s=5.0, queued=k) for k, s in enumerate(plan.stages)]
    lost_id = problem["peer_ids"][plan.stages[-1].device]
    alive = {pid: a for pid, a in PEERS.items() if pid != lost_id}
    snap = snapshot_from_source(state(stats=stats, announcements=alive, micro_batches=2, tokens_per_s=9.5))
    stage = snap.plan.stages[0]
    assert (stage.busy_share, stage.tokens_per_s, stage.in_flight, stage.step_ms) == (0.25, 10.0, 0, 50.0)
    lost_name = problem["devices"][plan.stages[-1].device]["name"]
    lost = next(p for p in snap.peers if p.name == lost_name)
    assert not lost.alive
    text = render_text(topology(snap))
    assert f"peer {lost_name} was lost" in text and "pipeline: 9.5 tok/s, 2 micro-batches in flight" in text


def test_without_a_plan_only_the_source_and_peers_show():
    text = render_text(topology(snapshot_from_source(state(problem=None, plan=None))))
    assert "No plan yet" in text and "desk" in text and "attic" in text


def test_decode_time_from_a_summarised_announcement():
    assert decode_ms((1000, 2000, 3000), 32, summarised=True) == (1000 + 2000 * 30 + 3000) / 1e3
    assert decode_ms((), 32, summarised=False) is None
