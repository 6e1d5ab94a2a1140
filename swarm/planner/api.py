"""plan(): the planner's one entry point, for our exact planner and every named strategy.

Ours (the default) is swarm.planner.exact; the paper's algorithms and baselines are in
swarm.planner.strategies.
"""

from __future__ import annotations

from swarm.planner.plan import Plan
from swarm.planner.problem import Problem
from swarm.planner.search import OBJECTIVES
from swarm.planner.strategies import run_strategy


def plan(problem: Problem, objective: str = "latency", inflight: int = 1, strategy: str | None = None,
         **options) -> Plan:
    """Best plan for the objective ("latency", "throughput" or "cycle" with `inflight` micro-batches).

    strategy None/"ours" is exact (or bounded with a reported gap); the paper's algorithms and
    baselines are available by name (see swarm.planner.strategies.STRATEGIES).
    Raises InfeasibleError when no plan fits memory and links.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if int(inflight) < 1:
        raise ValueError(f"inflight must be >= 1, got {inflight!r}")
    return run_strategy(problem, strategy or "ours", objective, inflight, **options)
