"""Re-planning on link changes (swarm.planner.replan.decide) against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest

from swarm.planner.exact import plan_ours
from swarm.planner.problem import Problem
from swarm.planner.replan import decide

from .brute import all_plans, optimum
from .gen import random_problem

MBIT = 1e6 / 8


def trio(rate_src_a: float = 50.0) -> Problem:
    """A slow source, a fast peer a and a middling peer b; 64 KiB cross every cut."""
    n = 6
    return Problem.from_json({
        "source": 0,
        "layers": [{"name": f"u{i}", "mem": 1.0, "out": 65536.0} for i in range(n)],
        "devices": [{"name": "src", "mem": 100.0, "time": [0.03] * n},
                    {"name": "a", "mem": 100.0, "time": [0.001] * n},
                    {"name": "b", "mem": 100.0, "time": [0.002] * n}],
        "bandwidth": [[0, rate_src_a * MBIT, 50 * MBIT], [50 * MBIT, 0, 50 * MBIT], [50 * MBIT, 50 * MBIT, 0]],
        "latency": [[0, 1e-4, 1e-4], [1e-4, 0, 1e-4], [1e-4, 1e-4, 0]],
        "return_bytes": 8.0,
    })


def names(problem: Problem, stages) -> list[str]:
    return [problem.device_names[s.device] for s in stages]


def test_unchanged_or_noisy_links_keep_the_plan_without_planning():
    p = trio()
    deployed = plan_ours(p, "latency").stages
    assert decide(p, deployed, p.bandwidth, p.latency).replan is False
    noisy = decide(p, deployed, p.bandwidth * 0.9, p.latency * 1.1)
    assert noisy.replan is False and noisy.best is None  # under the change gate: nothing planned


def test_a_slowed_link_moves_the_plan_to_the_brute_force_optimum():
    p = trio()
    deployed = plan_ours(p, "latency").stages
    assert names(p, deployed) == ["src", "a"]
    slowed = trio(rate_src_a=1.0)
    d = decide(p, deployed, slowed.bandwidth, slowed.latency)
    assert d.replan, d.reason
    assert names(slowed, d.best.stages) == ["src", "b"]
    assert math.isclose(d.best_s, optimum(all_plans(slowed), "latency"), rel_tol=1e-9)
    assert d.deployed_s > d.best_s * 1.05


def test_a_moved_link_that_the_plan_does_not_depend_on_changes_nothing():
    p = trio()
    deployed = plan_ours(p, "latency").stages
    bw = p.bandwidth.copy()
    bw[0, 2] = bw[2, 0] = 5 * MBIT  # b is unused: slowing its links cannot help another plan
    d = decide(p, deployed, bw, p.latency)
    assert not d.replan and d.best is not None and tuple(d.best.stages) == tuple(deployed)


def test_a_gain_too_small_to_pay_for_a_redeploy_keeps_the_plan():
    p = trio()
    deployed = plan_ours(p, "latency").stages
    slowed = trio(rate_src_a=1.0)
    assert decide(p, deployed, slowed.bandwidth, slowed.latency).replan
    d = decide(p, deployed, slowed.bandwidth, slowed.latency, min_gain_s=1.0)  # one second per token
    assert not d.replan and names(slowed, d.best.stages) == ["src", "b"]


def test_a_vanished_link_forces_a_new_plan():
    p = trio()
    deployed = plan_ours(p, "latency").stages
    bw = p.bandwidth.copy()
    bw[0, 1] = bw[1, 0] = 0.0
    d = decide(p, deployed, bw, p.latency)
    assert d.replan and d.deployed_s == math.inf and names(p, d.best.stages) == ["src", "b"]


@pytest.mark.parametrize("objective", ["latency", "throughput", "cycle"])
def test_decision_matches_brute_force_on_random_link_changes(objective):
    rng = np.random.default_rng(14)
    checked = 0
    for _ in range(150):
        p = random_problem(rng)
        if p.n_devices < 2:
            continue
        before = all_plans(p)
        if not before:
            continue
        m = int(rng.integers(1, 4))
        deployed = plan_ours(p, objective, m).stages
        bw = p.bandwidth * rng.choice([0.1, 1.0, 10.0], size=p.bandwidth.shape)
        new = Problem(**{**p.__dict__, "bandwidth": bw})
        after = all_plans(new)
        d = decide(p, deployed, bw, p.latency, objective, m, min_change=0.0, min_gain=0.05, min_gain_s=0.0)
        if not after:
            assert not d.replan
            continue
        best = optimum(after, objective, m)
        assert math.isclose(d.best_s, best, rel_tol=1e-9)
        current = [max(r / m, q) if objective == "cycle" else (r if objective == "latency" else q)
                   for r, q, st in after if st == tuple((s.device, s.start, s.end) for s in deployed)]
        current_s = current[0] if current else math.inf
        assert d.replan == (d.best is not None and tuple(d.best.stages) != tuple(deployed)
                            and best < current_s * 0.95)
        checked += 1
    assert checked > 60


def test_profile_drift_names_stages_whose_live_steps_disagree_by_more_than_a_fifth():
    from swarm.planner.replan import profile_drift

    predicted = [0.010, 0.020, 0.030, 0.005]
    measured = [0.0115, 0.026, None, 0.004]  # +15%, +30%, not measured, -20% exactly
    assert profile_drift(predicted, measured) == [(1, 0.020, 0.026)]
    assert profile_drift(predicted, measured, limit=0.1) == [(0, 0.010, 0.0115), (1, 0.020, 0.026), (3, 0.005, 0.004)]
