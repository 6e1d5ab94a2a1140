"""Pipeline simulator (closed form vs event simulation) and batch-size-aware planning vs brute force."""

from __future__ import annotations

import numpy as np
import pytest

from swarm.planner import Problem, simulate_pipeline
from swarm.planner.batching import plan_batched

from .brute import all_plans, optimum


def test_balanced_pipeline_efficiency_matches_the_notes_table():
    # K balanced stages, hops free: no barrier min(1, m/K); barrier m / (K + m - 1)
    for k in (4, 8, 15):
        for m in (4, 8, 16):
            r = simulate_pipeline([1.0] * k, [0.0] * k, m=m, b=1, barrier=False)
            assert r.steady_tokens_per_s == pytest.approx(min(1.0, m / k))
            rb = simulate_pipeline([1.0] * k, [0.0] * k, m=m, b=1, barrier=True)
            assert rb.steady_tokens_per_s == pytest.approx(m / (k + m - 1))


@pytest.mark.parametrize("barrier", [False, True])
def test_event_simulation_converges_to_the_closed_form(barrier):
    stages, hops = [0.010, 0.004, 0.007], [0.001, 0.002, 0.0005]
    for m, b in ((1, 1), (3, 2), (8, 4)):
        r = simulate_pipeline(stages, hops, m=m, b=b, barrier=barrier, generated_tokens=400)
        assert r.tokens_per_s == pytest.approx(r.steady_tokens_per_s, rel=0.02)
        assert r.generated_tokens == m * b * 400
        # the bottleneck stage is busiest; nothing is busy more than all the time
        assert max(r.busy_share) == r.busy_share[0] and max(r.busy_share) <= 1.0 + 1e-9


def test_prefill_round_and_busy_share():
    r = simulate_pipeline([1.0, 1.0], [0.0, 0.0], m=2, b=1, generated_tokens=3,
                          prefill_stage_times_s=[5.0, 5.0], prefill_hop_times_s=[0.0, 0.0], input_tokens=32)
    # no barrier, 2 jobs on 2 servers: prefill 5+5 (job 2 waits 5), then 2 decode rounds of 2 each
    assert r.total_s == pytest.approx(15 + 4)
    assert r.busy_share == pytest.approx(((5 + 5 + 4) / 19, (5 + 5 + 4) / 19))
    seq = simulate_pipeline([1.0, 2.0], [0.5, 0.5], m=1, b=1)
    assert seq.sequential_s_per_token == 4.0 and seq.steady_tokens_per_s == pytest.approx(0.25)


def test_simulating_a_plan_uses_its_fixed_costs():
    """The simulator and the planner agree on a plan with hop overheads: R and P are the plan's,
    and a stage's busy share counts its overhead (it occupies the stage)."""
    from swarm.planner import Problem, plan, simulate_plan

    dev = lambda name, oh: {"name": name, "mem": 100, "time": [1, 4, 4, 1], "step_overhead": 0.1,  # noqa: E731
                            "hop_overhead": oh}
    p = plan(Problem.from_json({
        "source": 0, "layers": [{"name": f"u{i}", "mem": 1, "out": 1} for i in range(4)],
        "devices": [dev("a", 0.5), dev("b", 1.0)], "bandwidth": [[0, 10], [10, 0]], "return_bytes": 1}),
        "throughput")
    assert len(p.stages) == 2 and p.overhead_s == (0.6, 1.1)
    sim = simulate_plan(p, m=2)
    assert sim.round_trip_s == pytest.approx(p.latency_s) and sim.bottleneck_s == pytest.approx(p.bottleneck_s)
    cycle = max(p.latency_s / 2, p.bottleneck_s)  # two micro-batches in flight
    assert sim.busy_share == pytest.approx(tuple(t / cycle for t in p.stage_s))
    assert sum(p.stage_s) > sum(p.compute_s) + 1.6


def batched_problem(base: dict, b: int, m: int) -> Problem:
    """Times grow sublinearly with b, memory with m * b (KV), hops with b."""
    d = {**base}
    d["layers"] = [{**u, "mem": u["mem"] + 0.05 * m * b, "out": u["out"] * b} for u in base["layers"]]
    d["devices"] = [{**dev, "time": [t * (1 + 0.3 * (b - 1)) for t in dev["time"]]} for dev in base["devices"]]
    return Problem.from_json(d)


def test_batch_aware_planning_matches_brute_force():
    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(12):
        n, mdev = int(rng.integers(3, 6)), int(rng.integers(2, 4))
        base = {"source": 0,
                "layers": [{"name": f"u{i}", "mem": 1.0, "out": 0.5} for i in range(n)],
                "devices": [{"name": f"d{j}", "mem": float(rng.uniform(1.5, 4)),
                             "time": rng.uniform(0.5, 2, n).tolist()} for j in range(mdev)],
                "bandwidth": rng.uniform(1, 5, (mdev, mdev)).tolist(), "return_bytes": 0.1}
        want, arg = 0.0, None
        for b in (1, 2, 4):
            for m in (1, 2, 4):
                c = optimum(all_plans(batched_problem(base, b, m)), "cycle", m)
                if c < np.inf and b / c > want:
                    want, arg = b / c, (b, m)
        if arg is None:
            continue
        got = plan_batched(lambda b, m: batched_problem(base, b, m), (1, 2, 4), (1, 2, 4))
        assert got.tokens_per_s == pytest.approx(want, rel=1e-9)
        checked += 1
    assert checked >= 8
