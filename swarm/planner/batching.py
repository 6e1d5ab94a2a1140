"""Batch-size-aware planning (the paper's future work): choose b, m and the plan together.

A micro-batch of b sequences makes every step slower (more KV to read, more FLOPs) and every
hop bigger, and m micro-batches in flight preallocate KV for m * b * (I + G) tokens, so the
problem itself depends on (b, m): the caller supplies `build(b, m) -> Problem` (roofline
or profiles). For each (b, m) we plan with the cycle objective (exact for max(R/m, P)) and
keep the best decode rate b * min(m / R, 1 / P) (or the barrier rate), optionally under a
per-sequence token interval bound m * cycle <= slo_s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from swarm.planner.api import plan
from swarm.planner.plan import Plan
from swarm.planner.problem import InfeasibleError, Problem
from swarm.planner.simulate import steady_rate

BATCHES = (1, 2, 4, 8, 16, 32)
INFLIGHTS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class BatchedPlan:
    batch: int  # b: sequences per micro-batch
    inflight: int  # m: micro-batches in flight
    plan: Plan
    tokens_per_s: float  # steady decode rate, all sequences together
    token_interval_s: float  # time between two tokens of one sequence


def rate(p: Plan, b: int, m: int, barrier: bool = False) -> float:
    """Steady decode tokens/s of a plan with m micro-batches of b sequences."""
    return b * steady_rate(p.latency_s, p.bottleneck_s, m, barrier)


def plan_batched(build: Callable[[int, int], Problem], batches: Iterable[int] = BATCHES,
                 inflights: Iterable[int] = INFLIGHTS, strategy: str | None = None, objective: str = "cycle",
                 barrier: bool = False, slo_s: float | None = None, max_sequences: int | None = None,
                 **options) -> BatchedPlan:
    """Best (b, m, plan) by decode throughput; raises InfeasibleError if no (b, m) fits.

    max_sequences caps b * m (the paper's "batch size" is the sequences in flight in total);
    options go to the strategy (e.g. cloud=, devices=).
    """
    best: BatchedPlan | None = None
    last_error: InfeasibleError | None = None
    for b in batches:
        for m in inflights:
            if max_sequences is not None and b * m > max_sequences:
                break
            try:
                p = plan(build(b, m), objective, inflight=m, strategy=strategy, **options)
            except InfeasibleError as e:  # more in flight only needs more memory: stop growing m
                last_error = e
                break
            r = rate(p, b, m, barrier)
            interval = m * b / r if r > 0 else float("inf")
            if slo_s is not None and interval > slo_s:
                continue
            if best is None or r > best.tokens_per_s * (1 + 1e-12):
                best = BatchedPlan(b, m, p, r, interval)
    if best is None:
        raise last_error or InfeasibleError("no batch size and micro-batch count meets the bound", 0, 0, 0)
    return best
