"""Our planner ("ours"): detect the problem's structure, then run the fastest exact method.

Structure detected, fastest first:
- identical blocks on one shared network: a knapsack over devices (swarm.planner.shared);
- identical blocks (units 1..N-2 equal on every device): Held-Karp over device types plus
  a greedy block count per device (swarm.planner.blocks);
- otherwise the DP over device types with a vector over units (swarm.planner.generic);
- when neither fits the work budget (many distinct devices, arbitrary links, uneven units):
  near-identical blocks are bracketed by two identical-block problems, anything else gets
  beam search with a relaxation bound; either way the gap is reported (swarm.planner.bounded).
"""

from __future__ import annotations

import logging

from swarm.planner import blocks, bounded, generic, shared
from swarm.planner.plan import Plan, evaluate
from swarm.planner.problem import Problem
from swarm.planner.search import optimise
from swarm.planner.types import build_space, device_type_key, group_devices, state_count

log = logging.getLogger(__name__)

GENERIC_WORK_LIMIT = 3e8  # inner-loop operations per solve before exact-generic is out of reach
BLOCKS_STATE_LIMIT = 70_000  # type states for Held-Karp over types (17 distinct devices; time and memory grow with it)


def plan_ours(problem: Problem, objective: str, inflight: int = 1) -> Plan:
    """Our exact planner: structure detection, then the fastest exact method."""
    method, oracle = choose_method(problem)
    if oracle is None:
        if blocks.block_structure(problem) is None and bounded.block_spread(problem) <= bounded.BRACKET_SPREAD:
            return bounded.plan_bracketed(problem, objective, inflight,
                                          lambda p: plan_ours(p, objective, inflight))
        return bounded.plan_bounded(problem, objective, inflight)
    space = getattr(oracle, "space", None)
    found = optimise(oracle, objective, inflight, lower=relaxation(problem, space) if space else None)
    if found is None:
        raise problem.infeasible()
    log.debug("%s via %s: %d oracle calls", objective, method, found.evaluations)
    return evaluate(problem, found.stages, inflight, objective=objective, strategy="ours", method=method)


def choose_method(problem: Problem):
    """(method name, oracle) for the fastest exact method; (name, None) when none is in reach."""
    structure = blocks.block_structure(problem)
    if structure is not None and shared.shared_network(problem):
        return "shared", shared.SharedOracle(problem, structure)
    if structure is not None:
        members = group_devices(problem, blocks.block_device_key(problem))
        if state_count([len(m) for m in members]) <= BLOCKS_STATE_LIMIT:
            return f"blocks/{len(members)} types", blocks.BlocksOracle(problem, build_space(members), structure)
    members = group_devices(problem, device_type_key(problem))
    n_states = state_count([len(m) for m in members])
    if n_states * len(members) ** 2 * (problem.n_units + 1) ** 2 <= GENERIC_WORK_LIMIT:
        return f"generic/{len(members)} types", generic.GenericOracle(problem, build_space(members))
    log.info("no exact method in reach (%d types, %d units): bounded search", len(members), problem.n_units)
    return "bounded", None


def relaxation(problem: Problem, space) -> bounded.RelaxedOracle:
    """The devices-may-repeat relaxation over the same types: a cheap lower bound for the search."""
    seg, hop, ret = generic.type_costs(problem, space)
    return bounded.RelaxedOracle(seg, hop, ret, 0, generic.alone_time(problem, seg))


