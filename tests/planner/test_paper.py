"""The paper's Algorithm 1 memory bookkeeping, shown wrong on two tiny problems."""

from __future__ import annotations

import pytest

from swarm.planner import Problem, plan
from swarm.planner import paper
from swarm.planner.strategies import InvalidPlanError, run_strategy


def two_devices(unit_mem, device_mem, times):
    return Problem.from_json({
        "source": 0,
        "layers": [{"name": f"u{i}", "mem": m, "out": 1} for i, m in enumerate(unit_mem)],
        "devices": [{"name": f"d{j}", "mem": device_mem[j], "time": times[j]} for j in range(2)],
        "bandwidth": [[1, 1], [1, 1]], "return_bytes": 0,
    })


def test_algorithm1_overflows_a_device():
    # d0 holds 4 bytes; Alg. 1 checks each unit alone against a counter, so it puts all 5 on d0.
    prob = two_devices([3, 1, 1], [4, 6], [[2, 5, 1], [4, 5, 1]])
    result = paper.algorithm1(prob)
    assert [s.device for s in result.stages] == [0]
    assert result.problems == ("device d0 needs 5 B of its 4 B",)
    with pytest.raises(InvalidPlanError, match="d0 needs 5 B of its 4 B"):
        run_strategy(prob, "paper-latency")
    best = plan(prob, "latency")  # e.g. d0 runs u0 u1 (4 B), hop 1 B at 1 B/s, d1 runs u2: 7 + 1 + 1
    assert best.latency_s == (2 + 5) + 1 + 1 and max(best.mem_used[0] - 4, best.mem_used[-1] - 6) <= 0


def test_algorithm1_prunes_the_only_plan():
    # d1 can hold u1 + u2 (3 bytes) but its counter is spent on earlier updates: Alg. 1 finds nothing.
    prob = two_devices([1, 1, 2], [3, 3], [[2, 1, 5], [1, 4, 1]])
    assert paper.algorithm1(prob) is None
    best = plan(prob, "latency")
    assert [(s.device, s.start, s.end) for s in best.stages] == [(0, 0, 2), (1, 2, 3)]
    assert best.latency_s == (2 + 1) + 1 + 1  # d0 runs u0 u1, hop of 1 B at 1 B/s, d1 runs u2, free return


def test_paper_throughput_notes_that_it_ignores_the_return_hop():
    prob = two_devices([1, 1, 1], [3, 3], [[1, 1, 1], [1, 1, 1]])
    p = run_strategy(prob, "paper-throughput", "throughput")
    assert any("ignores the hop returning the token" in n for n in p.notes)
