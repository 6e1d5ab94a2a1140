"""Every objective against brute force on random small problems (M <= 5, N <= 8); half of them
with per-device fixed costs (step constant, hop overhead: issue 26)."""

from __future__ import annotations

import math

import numpy as np

from swarm.planner import InfeasibleError, Problem, plan
from swarm.planner import paper
from swarm.planner.blocks import BlocksOracle, block_device_key, block_structure
from swarm.planner.bounded import plan_bounded, plan_bracketed
from swarm.planner.generic import GenericOracle
from swarm.planner.plan import evaluate
from swarm.planner.search import optimise
from swarm.planner.types import build_space, device_type_key, group_devices

from .brute import all_plans, optimum
from .gen import random_problem

N_PROBLEMS = 540
OBJECTIVES = ("latency", "throughput", "cycle")


def value(p, objective):
    return {"latency": p.latency_s, "throughput": p.bottleneck_s, "cycle": p.cycle_s}[objective]


def close(a, b):
    return a == b or math.isclose(a, b, rel_tol=1e-9)


def problems():
    rng = np.random.default_rng(20261127)
    for i in range(N_PROBLEMS):
        yield rng, random_problem(rng, identical_blocks=i % 3 == 0 or i % 6 == 1, types=i % 3 == 1,
                                  overheads=i % 4 >= 2)


def test_ours_matches_brute_force_on_every_objective():
    feasible = infeasible = 0
    methods = set()
    for rng, prob in problems():
        plans = all_plans(prob)
        for objective in OBJECTIVES:
            m = int(rng.integers(1, 6))
            want = optimum(plans, objective, m)
            try:
                got = plan(prob, objective, inflight=m)
            except InfeasibleError:
                assert want == math.inf, (objective, m)
                infeasible += 1
                continue
            feasible += 1
            methods.add(got.method.split("/")[0])
            assert close(value(got, objective), want), (objective, m, got, want)
            # the reported figures are the plan's real cost
            again = evaluate(prob, got.stages, m)
            assert close(again.latency_s, got.latency_s) and close(again.bottleneck_s, got.bottleneck_s)
    assert feasible > 900 and infeasible > 50
    assert methods == {"shared", "blocks", "generic"}


def test_generic_dp_matches_on_identical_block_problems_too():
    """The blocks method is the default there; the generic DP must agree with it and brute force."""
    for rng, prob in list(problems())[::3][:60]:
        plans = all_plans(prob)
        oracle = GenericOracle(prob, build_space(group_devices(prob, device_type_key(prob))))
        for objective in OBJECTIVES:
            found = optimise(oracle, objective, 3)
            want = optimum(plans, objective, 3)
            if found is None:
                assert want == math.inf
            else:
                assert close(value(evaluate(prob, found.stages, 3), objective), want)


def test_blocks_oracle_with_singleton_types_matches():
    for rng, prob in list(problems())[::3][:60]:
        st = block_structure(prob)
        assert st is not None
        oracle = BlocksOracle(prob, build_space([(prob.source,)] + [(d,) for d in range(prob.n_devices)
                                                                   if d != prob.source]), st)
        plans = all_plans(prob)
        for objective in OBJECTIVES:
            found = optimise(oracle, objective, 2)
            want = optimum(plans, objective, 2)
            assert (found is None and want == math.inf) or close(
                value(evaluate(prob, found.stages, 2), objective), want)


def test_blocks_oracle_over_device_types_matches_on_shared_networks():
    """Where the shared-network knapsack is the default, Held-Karp over types must agree."""
    checked = 0
    for i, (rng, prob) in enumerate(problems()):
        if i % 6 != 1 or prob.n_devices < 2:
            continue
        st = block_structure(prob)
        oracle = BlocksOracle(prob, build_space(group_devices(prob, block_device_key(prob))), st)
        plans = all_plans(prob)
        for objective in OBJECTIVES:
            found = optimise(oracle, objective, 3)
            want = optimum(plans, objective, 3)
            assert (found is None and want == math.inf) or close(
                value(evaluate(prob, found.stages, 3), objective), want)
        checked += 1
    assert checked > 50


def test_bounded_search_is_valid_and_its_gap_brackets_the_optimum():
    for rng, prob in list(problems())[:120]:
        plans = all_plans(prob)
        for objective in OBJECTIVES:
            want = optimum(plans, objective, 2)
            if want == math.inf:
                continue
            got = plan_bounded(prob, objective, 2)
            v = value(got, objective)
            assert v >= want * (1 - 1e-9)
            bound = v / (1 + got.gap)
            assert bound <= want * (1 + 1e-9)


def test_bracketing_near_identical_blocks_brackets_the_optimum():
    rng = np.random.default_rng(11)
    checked = 0
    for i in range(80):
        d = random_problem(rng, identical_blocks=True, overheads=i % 2 == 1).to_json()
        for dev in d["devices"]:  # measured profiles: blocks within a few percent of each other
            dev["time"] = [t * rng.uniform(0.95, 1.05) for t in dev["time"]]
        prob = Problem.from_json(d)
        plans = all_plans(prob)
        for objective in OBJECTIVES:
            want = optimum(plans, objective, 2)
            if want == math.inf:
                continue
            got = plan_bracketed(prob, objective, 2, lambda p: plan(p, objective, inflight=2))
            v = value(got, objective)
            assert v >= want * (1 - 1e-9) and v / (1 + got.gap) <= want * (1 + 1e-9)
            assert got.gap < 0.25
            checked += 1
    assert checked > 100


def test_paper_algorithm2_is_exact_when_the_return_hop_is_free():
    rng = np.random.default_rng(7)
    checked = 0
    for i in range(150):
        d = random_problem(rng, identical_blocks=i % 2 == 0).to_json()
        m = len(d["devices"])
        d["return_bytes"] = 0.0
        d["latency"] = [[0.0] * m for _ in range(m)]
        d["bandwidth"] = [[max(x, 0.5) for x in row] for row in d["bandwidth"]]
        prob = Problem.from_json(d)
        want = optimum(all_plans(prob), "throughput")
        got = paper.algorithm2(prob)
        assert (got is None and want == math.inf) or close(got.value, want)
        checked += got is not None
    assert checked > 50


def test_device_types_split_by_links_stay_exact():
    """Identical devices where one sits on a slower link: types are refined, plans stay optimal."""
    checked = grouped = 0
    for i, (rng, prob) in enumerate(problems()):
        if i % 3 != 1 or prob.n_devices < 4:
            continue
        d = prob.to_json()
        slow = (prob.source + 1) % prob.n_devices
        for j in range(prob.n_devices):
            if j != slow:
                d["bandwidth"][slow][j] = d["bandwidth"][j][slow] = d["bandwidth"][slow][j] / 3
        prob = Problem.from_json(d)
        members = group_devices(prob, device_type_key(prob))
        assert (slow,) in members
        grouped += len(members) < prob.n_devices
        plans = all_plans(prob)
        for objective in OBJECTIVES:
            want = optimum(plans, objective, 2)
            try:
                assert close(value(plan(prob, objective, inflight=2), objective), want)
            except InfeasibleError:
                assert want == math.inf
        checked += 1
    assert checked > 20 and grouped > 10
