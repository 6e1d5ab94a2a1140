"""A warm swarm is not re-shuffled for a small gain: the move cost of weights against the gain per token."""

from __future__ import annotations

import pytest

from swarm.planner.api import plan
from swarm.planner.problem import Problem
from swarm.planner.warm import HORIZON_TOKENS, holding_only, move_seconds, prefer_warm

UNITS = 6
UNIT_BYTES = [1e6] + [50e6] * 4 + [10e6]  # what moving each unit costs


def problem(cold_block_s: float, warm_block_s: float, bandwidth: float = 100e6) -> Problem:
    """Device 0 the source (room for the embedding only), 1 a cold peer, 2 a warm one."""
    def times(block_s):
        return [0.0001] + [block_s] * 4 + [0.001]

    big = 1e12
    return Problem.from_json({
        "source": 0,
        "layers": [{"name": f"u{i}", "mem": b, "out": 4096} for i, b in enumerate(UNIT_BYTES)],
        "devices": [{"name": "src", "mem": 2e6, "time": times(0.1)},
                    {"name": "cold", "mem": big, "time": times(cold_block_s)},
                    {"name": "warm", "mem": big, "time": times(warm_block_s)}],
        "bandwidth": [[0, bandwidth, bandwidth], [bandwidth] * 3, [bandwidth] * 3],
        "latency": [[0.0] * 3] * 3,
        "return_bytes": 8,
    })


HELD = [frozenset(range(UNITS)), frozenset(), frozenset(range(1, UNITS))]


def choose(p: Problem):
    best = plan(p, "latency")
    return best, prefer_warm(p, best, HELD, UNIT_BYTES, lambda x: x.latency_s, lambda q: plan(q, "latency"))


def test_a_small_gain_keeps_the_units_where_they_are():
    best, choice = choose(problem(cold_block_s=0.0100, warm_block_s=0.0101))
    assert [s.device for s in best.stages] == [0, 1]  # the cold peer is a little faster
    assert [s.device for s in choice.plan.stages] == [0, 2] and choice.move_s == 0
    assert "would not pay back" in choice.reason and choice.plan.notes


def test_a_large_gain_moves_the_weights():
    best, choice = choose(problem(cold_block_s=0.001, warm_block_s=0.01))
    # 4 x 9 ms = 36 ms a token, 36 s over the horizon: worth 2.1 s of transfer
    assert choice.plan is best and [s.device for s in best.stages] == [0, 1]
    assert choice.move_s == pytest.approx(sum(UNIT_BYTES[1:]) / 100e6)


def test_the_move_cost_is_bytes_over_the_measured_link():
    p = problem(0.01, 0.01, bandwidth=10e6)
    best = plan(p, "latency")
    stages = best.stages
    assert move_seconds(p, stages, [frozenset(range(UNITS))] * 3, UNIT_BYTES) == 0
    cold = [frozenset(range(UNITS)), frozenset(), frozenset()]
    assert move_seconds(p, stages, cold, UNIT_BYTES) == pytest.approx(sum(UNIT_BYTES[1:]) / 10e6)
    assert holding_only(p, HELD).time[1, 1] > 1e6 and holding_only(p, HELD).time[2, 1] == p.time[2, 1]


def test_equal_peers_the_warm_one_is_taken():
    best, choice = choose(problem(0.01, 0.01))
    assert [s.device for s in choice.plan.stages] == [0, 2]
    assert HORIZON_TOKENS >= 100
