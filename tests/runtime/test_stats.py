"""Per-stage statistics (swarm/runtime/stats.py) from counters, without sockets."""

from __future__ import annotations

import pytest

from swarm.runtime.deploy import StagePlacement
from swarm.runtime.stats import StageStats, rates

PLAN = (StagePlacement(None, 0, 2), StagePlacement("tcp://127.0.0.1:1", 2, 6))


def test_rates_are_differences_over_the_span():
    before = [{"busy_s": 1.0, "steps": 10, "tokens": 40, "queued": 0}, {"busy_s": 0.0, "steps": 0, "tokens": 0,
                                                                          "queued": 0}]
    now = [{"busy_s": 1.5, "steps": 14, "tokens": 60, "queued": 1}, {"busy_s": 3.0, "steps": 4, "tokens": 20,
                                                                       "queued": 2}]
    got = rates(PLAN, now, before, 2.0)
    assert got == [StageStats(None, 0, 2, 0.25, 10.0, 2.0, 1),
                   StageStats("tcp://127.0.0.1:1", 2, 6, 1.0, 10.0, 2.0, 2)]  # busy share capped at 1


def test_a_zero_span_does_not_divide_by_zero():
    counts = [{"busy_s": 0.0, "steps": 0, "tokens": 0, "queued": 0}] * 2
    assert [s.tokens_per_s for s in rates(PLAN, counts, counts, 0.0)] == pytest.approx([0.0, 0.0])
