"""One oracle for every objective.

An oracle answers R*(tau): the least round-trip latency over plans whose every stage and
hop (return included) is <= tau, with the stages of such a plan. Then
- latency    = R*(inf)
- throughput = the least candidate tau with R*(tau) finite (ties broken by least R)
- cycle(m)   = min over candidate tau of max(R*(tau) / m, tau): R* never grows with tau,
  so the crossing is found by bisection and the optimum is on one side of it.
Candidate taus are every value a stage or hop can take, so every optimum is among them.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from swarm.planner.plan import PlannedStage

REL_TOL = 1e-9  # float slack when comparing sums of unit times against a candidate tau
OBJECTIVES = ("latency", "throughput", "cycle")


def fits(x: np.ndarray | float, tau: float) -> np.ndarray | bool:
    """x <= tau with the slack that keeps prefix-sum rounding from excluding the optimum."""
    return x <= tau * (1 + REL_TOL) + 1e-15


class Oracle(Protocol):
    def candidates(self) -> np.ndarray: ...

    def solve(self, tau: float) -> tuple[float, Callable[[], list[PlannedStage]] | None]: ...


@dataclass(frozen=True)
class SearchResult:
    value: float  # the objective's optimum as the oracle sees it
    stages: list[PlannedStage]
    evaluations: int


def optimise(oracle: Oracle, objective: str, inflight: int = 1, lower: Oracle | None = None,
             bound: float | None = None) -> SearchResult | None:
    """Optimum of `objective` through the oracle; None when no plan exists.

    `lower`, if given, is a cheap oracle whose R*(tau) never exceeds the real one (a
    relaxation); its optimum is a lower bound, so the search gallops up from there and
    usually needs two or three real solves instead of a full bisection. `bound` is such a
    lower bound given directly.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "latency":
        r, build = oracle.solve(np.inf)
        return None if build is None else SearchResult(r, build(), 1)
    cands = oracle.candidates()
    if lower is not None:
        found = optimise(lower, objective, inflight)
        if found is None:
            return None
        bound = found.value if bound is None else max(bound, found.value)
    start = 0 if bound is None else int(np.searchsorted(cands, bound * (1 - 1e-9)))
    floor = getattr(oracle, "latency_floor", None)
    if floor is not None:  # a cheap lower bound on R*(tau), never growing with tau: skip hopeless taus
        m = max(1, int(inflight)) if objective == "cycle" else np.inf
        start = bisect.bisect_left(range(len(cands)), True, lo=start,
                                   key=lambda i: floor(float(cands[i])) / m <= float(cands[i]))
    cache: dict[int, tuple[float, Callable[[], list[PlannedStage]] | None]] = {}

    def at(i: int) -> tuple[float, Callable[[], list[PlannedStage]] | None]:
        if i not in cache:
            cache[i] = oracle.solve(float(cands[i]))
        return cache[i]

    if objective == "throughput":
        i = _first_true(len(cands), lambda i: at(i)[1] is not None, start)
        if i == len(cands):
            return None
        r, build = at(i)
        return SearchResult(float(cands[i]), build(), len(cache))
    m = max(1, int(inflight))
    i = _first_true(len(cands), lambda i: at(i)[1] is not None and at(i)[0] / m <= float(cands[i]), start)
    best: tuple[float, Callable[[], list[PlannedStage]]] | None = None
    if i < len(cands):
        best = (float(cands[i]), at(i)[1])
    if i > 0:
        r, build = at(i - 1)
        if build is not None and (best is None or r / m < best[0]):
            best = (r / m, build)
    if best is None:
        r, build = oracle.solve(np.inf)
        if build is None:
            return None
        best = (r / m, build)
    return SearchResult(best[0], best[1](), len(cache))


def _first_true(n: int, pred: Callable[[int], bool], start: int = 0) -> int:
    """Least i in [start, n) with pred(i) for a monotone predicate false below start; n if none.

    Gallops up from start (1, 2, 4... steps), then bisects the last step.
    """
    lo, hi, step = start, start, 1
    while hi < n and not pred(hi):
        lo, hi, step = hi + 1, hi + step, step * 2
    return bisect.bisect_left(range(n), True, lo=lo, hi=min(hi, n), key=pred)


def candidate_values(*arrays: np.ndarray) -> np.ndarray:
    """Sorted distinct finite values of the given arrays."""
    vals = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    return np.unique(vals[np.isfinite(vals)])
