"""Weights already in place: a warm swarm is not re-shuffled for a small gain. Pure.

A plan that gives a device units it does not hold costs their transfer from the
source before the first token: bytes / the measured source -> device bandwidth, the
devices fetching one after another (they share the source's uplink). The best plan
among those that move nothing (each device restricted to the units it holds) is
taken instead when the best plan's gain per token would not pay that back within
``horizon_tokens`` tokens:

    gain_s * horizon_tokens < move_s(best)

``held[d]`` is the set of units device d holds in the form the plan needs (the
source holds every unit; a peer serving the model holds them all; an open peer
holds what its unit cache has).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

from swarm.planner.plan import Plan, PlannedStage, evaluate
from swarm.planner.problem import InfeasibleError, Problem

HORIZON_TOKENS = 1000  # a few answers: a faster plan must repay its transfer within them
ABSENT_S = 1e9  # seconds per unit a device does not hold, in the problem that moves nothing


@dataclass(frozen=True)
class WarmChoice:
    plan: Plan
    move_s: float  # transfer time before the chosen plan's first token
    reason: str


def move_seconds(problem: Problem, stages: Sequence[PlannedStage], held: Sequence[frozenset[int]],
                 unit_bytes: Sequence[float]) -> float:
    """Seconds to move every unit a stage's device lacks from the source (inf without a link)."""
    total = 0.0
    for s in stages:
        missing = sum(unit_bytes[u] for u in range(s.start, s.end) if u not in held[s.device])
        if missing:
            bandwidth = float(problem.bandwidth[problem.source, s.device])
            total += missing / bandwidth if bandwidth > 0 else float("inf")
    return total


def holding_only(problem: Problem, held: Sequence[frozenset[int]]) -> Problem:
    """The problem in which a device can run only the units it holds (the others cost ABSENT_S)."""
    time = problem.time.copy()
    for d, units in enumerate(held):
        absent = [u for u in range(problem.n_units) if u not in units]
        time[d, absent] = ABSENT_S
    return replace(problem, time=time)


def prefer_warm(problem: Problem, best: Plan, held: Sequence[frozenset[int]], unit_bytes: Sequence[float],
                objective_of: Callable[[Plan], float], plan_fn: Callable[[Problem], Plan],
                horizon_tokens: int = HORIZON_TOKENS) -> WarmChoice:
    """``best``, or the best plan that moves no weights when ``best`` would not repay its move.

    ``plan_fn(problem) -> Plan`` is the planner (raising InfeasibleError); ``objective_of``
    reads the objective's seconds per token off a plan."""
    move = move_seconds(problem, best.stages, held, unit_bytes)
    if move == 0:
        return WarmChoice(best, 0.0, "every device holds its units")
    try:
        warm = plan_fn(holding_only(problem, held))
    except InfeasibleError:
        return WarmChoice(best, move, "no plan fits the units already in place")
    if objective_of(warm) >= ABSENT_S / 2:
        return WarmChoice(best, move, "no plan fits the units already in place")
    warm = evaluate(problem, warm.stages, best.inflight, objective=best.objective, strategy=best.strategy,
                    method=best.method)
    gain = objective_of(warm) - objective_of(best)
    if gain * horizon_tokens < move:
        why = (f"kept the units in place: moving weights ({_seconds(move)}) for {gain * 1e3:.2f} ms/token "
               f"would not pay back within {horizon_tokens} tokens")
        return WarmChoice(replace(warm, notes=warm.notes + (why,)), 0.0, why)
    return WarmChoice(best, move, f"moving weights ({_seconds(move)}) gains {gain * 1e3:.2f} ms/token")


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s >= 1 else f"{s * 1e3:.1f} ms"
