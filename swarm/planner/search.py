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

from swarm.planner.plan import Stage

REL_TOL = 1e-9  # float slack when comparing sums of unit times against a candidate tau
OBJECTIVES = ("latency", "throughput", "cycle")


def fits(x: np.ndarray | float, tau: float) -> np.ndarray | bool:
    """x <= tau with the slack that keeps prefix-sum rounding from excluding the optimum."""
    return x <= tau * (1 + REL_TOL) + 1e-15


class Oracle(Protocol):
    def candidates(self) -> np.ndarray: ...

    def solve(self, tau: float) -> tuple[float, Callable[[], list[Stage]] | None]: ...


@dataclass(frozen=True)
class SearchResult:
    value: float  # the objective's optimum as the oracle sees it
    stages: list[Stage]
    evaluations: int


def optimise(oracle: Oracle, objective: str, inflight: int = 1) -> SearchResult | None:
    """Optimum of `objective` through the oracle; None when no plan exists."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "latency":
        r, build = oracle.solve(np.inf)
        return None if build is None else SearchResult(r, build(), 1)
    cands = oracle.candidates()
    cache: dict[int, tuple[float, Callable[[], list[Stage]] | None]] = {}

    def at(i: int) -> tuple[float, Callable[[], list[Stage]] | None]:
        if i not in cache:
            cache[i] = oracle.solve(float(cands[i]))
        return cache[i]

    if objective == "throughput":
        i = _first_true(len(cands), lambda i: at(i)[1] is not None)
        if i == len(cands):
            return None
        r, build = at(i)
        return SearchResult(float(cands[i]), build(), len(cache))
    m = max(1, int(inflight))
    i = _first_true(len(cands), lambda i: at(i)[1] is not None and at(i)[0] / m <= float(cands[i]))
    best: tuple[float, Callable[[], list[Stage]]] | None = None
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


def _first_true(n: int, pred: Callable[[int], bool]) -> int:
    """Least i in [0, n) with pred(i) for a monotone predicate; n if none."""
    return bisect.bisect_left(range(n), True, key=pred)


def candidate_values(*arrays: np.ndarray) -> np.ndarray:
    """Sorted distinct finite values of the given arrays."""
    vals = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    return np.unique(vals[np.isfinite(vals)])
