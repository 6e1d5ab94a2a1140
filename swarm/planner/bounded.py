"""Bounded search for problems no exact method reaches (many distinct devices, arbitrary
links, uneven units): a plan, a proven lower bound, and the gap between them.

- Near-identical blocks (measured profiles are never exactly equal): solve exactly the two
  problems with the blocks levelled at their smallest and their largest figures; the first
  gives the bound, the second (or the first, if valid) the plan. Gap ~ the profiles' spread.

- Bound: the same DP without the "each device once" rule (a device may reappear), which
  every valid plan satisfies, strengthened by a capacity floor that keeps that rule
  (FloorOracle); its optimum is a lower bound for every objective.
- Plan: the subset DP keeping only the `width` most promising (devices used, last device)
  states per chain length, ranked by their best latency so far plus the bound's cost to go.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np

from swarm.planner.plan import Plan, PlannedStage, evaluate
from swarm.planner.problem import InfeasibleError, Problem
from swarm.planner.search import candidate_values, fits, optimise

BEAM_WORK = 4e7  # operations per beam solve; the width follows from it


class _Masked:
    def __init__(self, seg: np.ndarray, hop: np.ndarray, ret: np.ndarray):
        self.seg, self.hop, self.ret = seg, hop, ret

    def masked(self, tau: float):
        f = lambda x: np.where(fits(x, tau), x, np.inf)  # noqa: E731
        return f(self.seg), f(self.hop), f(self.ret)


class _Costs(_Masked):
    def __init__(self, problem: Problem):
        n = problem.n_units
        pt, pm = problem.prefix_time(), problem.prefix_mem()
        ok = (np.arange(n + 1)[:, None] < np.arange(n + 1)[None, :])[None] & (
            (pm[None, :] - pm[:, None])[None] <= problem.device_mem[:, None, None] * (1 + 1e-12))
        fixed = problem.stage_overhead()[:, None, None]  # a multi-stage plan's fixed per-step costs
        self.seg = np.where(ok, pt[:, None, :] - pt[:, :, None] + fixed, np.inf)  # [M, a, b]
        self.hop = problem.cut_hops()  # [N+1, M, M]
        self.hop[0] = np.inf
        idx = np.arange(problem.n_devices)
        self.hop[:, idx, idx] = np.inf
        self.ret = problem.return_time()
        # the source alone pays no hop overhead: its plan is costed apart (inf if it does not fit)
        self.alone = problem.alone_time() if np.isfinite(self.seg[problem.source, 0, n]) else np.inf


class RelaxedOracle:
    """R*(tau) when devices may repeat: a lower bound on the true R*(tau). O(M^2 N^2)."""

    def __init__(self, seg: np.ndarray, hop: np.ndarray, ret: np.ndarray, source: int, alone: float = np.inf):
        """seg[D, a, b], hop[N+1, D, D], ret[D] over devices or device types D; alone: the
        one-stage plan's R (seg carries a multi-stage plan's fixed costs, which it does not pay)."""
        self.c, self.source, self.alone = _Masked(seg, hop, ret), source, alone

    @classmethod
    def for_devices(cls, problem: Problem) -> RelaxedOracle:
        c = _Costs(problem)
        return cls(c.seg, c.hop, c.ret, problem.source, c.alone)

    def candidates(self) -> np.ndarray:
        return candidate_values(self.c.seg, self.c.hop, self.c.ret, [self.alone])

    def table(self, tau: float) -> np.ndarray:
        seg, hop, _ = self.c.masked(tau)
        m, n = seg.shape[0], seg.shape[1] - 1
        L = np.full((m, n + 1), np.inf)  # L[v, b]: least latency with units [0, b) done, v last
        L[self.source] = seg[self.source, 0]
        for b in range(1, n + 1):  # a segment [a, b) only reads L[:, a] for a < b, already final
            x = (L[:, None, :b] + hop[:b].transpose(1, 2, 0)).min(axis=0)  # [v, a]
            L[:, b] = np.minimum(L[:, b], (x + seg[:, :b, b]).min(axis=1))
        return L

    def solve(self, tau: float) -> tuple[float, Callable[[], list[PlannedStage]] | None]:
        _, _, ret = self.c.masked(tau)
        r = float((self.table(tau)[:, -1] + ret).min())
        if fits(self.alone, tau):
            r = min(r, self.alone)
        return (r, lambda: []) if np.isfinite(r) else (np.inf, None)


class BeamOracle:
    """The subset DP restricted to a beam: a valid plan, not always the best."""

    def __init__(self, problem: Problem, width: int | None = None):
        self.problem, self.c = problem, _Costs(problem)
        m, n = problem.n_devices, problem.n_units
        self.width = width or max(4, int(BEAM_WORK / (m * m * (n + 1) ** 2)))
        self.relaxed = RelaxedOracle.for_devices(problem)

    def candidates(self) -> np.ndarray:
        return self.relaxed.candidates()

    def solve(self, tau: float) -> tuple[float, Callable[[], list[PlannedStage]] | None]:
        p = self.problem
        seg, hop, ret = self.c.masked(tau)
        n, src = p.n_units, p.source
        # cost to go from unit b, ignoring who ran what: min over devices of the rest on one device
        togo = np.nan_to_num(np.min(seg[:, :, n], axis=0), posinf=0.0)
        beam = {(1 << src, src): (seg[src, 0].copy(), [(src, 0)])}
        best, best_path = np.inf, None
        if fits(self.c.alone, tau):  # one stage: no hop overhead (seg[src, 0, n] counts it)
            best, best_path = self.c.alone, [(src, 0)]
        while beam:
            nxt: dict[tuple[int, int], tuple[np.ndarray, list]] = {}
            for (mask, u), (vec, path) in beam.items():
                done = vec[n] + ret[u]
                if done < best:
                    best, best_path = done, path
                for v in range(p.n_devices):
                    if mask >> v & 1:
                        continue
                    x = vec + hop[:, u, v]  # [a]
                    z = x[:, None] + seg[v]  # [a, b]
                    new = z.min(axis=0)
                    if not np.isfinite(new).any():
                        continue
                    key = (mask | 1 << v, v)
                    if key not in nxt or _score(new, togo) < _score(nxt[key][0], togo):
                        nxt[key] = (new, path + [(v, z.argmin(axis=0))])
            ranked = sorted(nxt.items(), key=lambda kv: _score(kv[1][0], togo))
            beam = dict(ranked[: self.width])
        if best_path is None:
            return np.inf, None
        return best, lambda: _unwind(best_path, n)


class FloorOracle:
    """A lower bound on R*(tau) keeping "each device once": max of the relaxation and a capacity
    floor (interior units 1..N-2 on devices in one run each, at most as long as the device's
    longest run within tau and memory, each unit at least the device's cheapest unit time)."""

    def __init__(self, problem: Problem):
        self.problem, self.relaxed = problem, RelaxedOracle.for_devices(problem)
        inner = slice(1, problem.n_units - 1) if problem.n_units >= 3 else slice(0, 0)
        self.t, w = problem.time[:, inner], problem.layer_mem[inner]
        self.pt = np.concatenate([np.zeros((len(self.t), 1)), np.cumsum(self.t, axis=1)], axis=1)
        self.pm = np.concatenate([[0.0], np.cumsum(w)])
        self.price = self.t.min(axis=1, initial=np.inf) if self.t.shape[1] else np.zeros(len(self.t))
        self.ends = problem.time[problem.source, 0] + (problem.time[:, -1].min() if problem.n_units >= 2 else 0.0)

    def candidates(self) -> np.ndarray:
        return self.relaxed.candidates()

    def floor(self, tau: float) -> float:
        n = self.t.shape[1]
        if n == 0:
            return 0.0
        caps = np.empty(len(self.t), dtype=np.int64)
        for d in range(len(self.t)):
            by_time = np.searchsorted(self.pt[d], self.pt[d, :-1] + tau * (1 + 1e-9) + 1e-15, side="right") - 1
            by_mem = np.searchsorted(self.pm, self.pm[:-1] + self.problem.device_mem[d] * (1 + 1e-12), side="right") - 1
            caps[d] = (np.minimum(by_time, by_mem) - np.arange(n)).max()
        order = np.argsort(self.price)
        before = np.cumsum(caps[order]) - caps[order]
        if before[-1] + caps[order][-1] < n:
            return np.inf
        take = np.clip(n - before, 0, caps[order])
        return float(self.ends + take @ self.price[order])

    def solve(self, tau: float) -> tuple[float, Callable[[], list[PlannedStage]] | None]:
        r, build = self.relaxed.solve(tau)
        r = max(r, self.floor(tau))
        return (r, build) if np.isfinite(r) else (np.inf, None)


def _score(vec: np.ndarray, togo: np.ndarray) -> float:
    return float(np.min(vec + togo))


def _unwind(path: list, n: int) -> list[PlannedStage]:
    """path: [(src, 0), (v1, argmin over a for each b), ...] -> stages, walking the cuts back."""
    stages, b = [], n
    for v, arg in reversed(path[1:]):
        a = int(arg[b])
        stages.append(PlannedStage(v, a, b))
        b = a
    stages.append(PlannedStage(path[0][0], 0, b))
    return list(reversed(stages))


def plan_bounded(problem: Problem, objective: str, inflight: int = 1) -> Plan:
    """Beam-search plan with its relative gap to the relaxation's proven lower bound."""
    lower = optimise(FloorOracle(problem), objective, inflight)
    if lower is None:
        raise problem.infeasible()
    found = optimise(BeamOracle(problem), objective, inflight, bound=lower.value)
    if found is None:
        raise problem.infeasible("no plan found by bounded search")
    plan_ = evaluate(problem, found.stages, inflight, objective=objective, strategy="ours", method="bounded")
    value = _value(plan_, objective)
    bound = lower.value
    gap = max(0.0, (value - bound) / bound) if bound > 0 else 0.0
    return Plan(**{**plan_.__dict__, "gap": gap,
                   "notes": (f"bounded search: within {gap:.1%} of the proven lower bound {bound:.6g} s",)})


BRACKET_SPREAD = 0.25  # blocks whose figures differ by less than this are bracketed, not beam-searched


def block_spread(problem: Problem) -> float:
    """Largest relative spread of the blocks' memory, output and per-device time (inf if N < 3)."""
    n = problem.n_units
    if n < 3:
        return np.inf
    parts = [problem.layer_mem[1:-1], problem.layer_out[:-1], *problem.time[:, 1:-1]]
    return max(float(np.ptp(x) / x.max()) if x.max() > 0 else 0.0 for x in parts)


def bracket(problem: Problem) -> tuple[Problem, Problem]:
    """(lo, hi): the blocks made identical at their smallest and at their largest figures.

    Every plan of the real problem is a plan of lo costing no more, so lo's optimum is a lower
    bound; every plan of hi is a plan of the real problem costing no less, so it is feasible."""
    def level(f):
        mem, out, t = problem.layer_mem.copy(), problem.layer_out.copy(), problem.time.copy()
        mem[1:-1] = f(mem[1:-1])
        out[:-1] = f(out[:-1])
        t[:, 1:-1] = f(t[:, 1:-1], axis=1)[:, None]
        return replace(problem, layer_mem=mem, layer_out=out, time=t)

    return level(np.min), level(np.max)


def plan_bracketed(problem: Problem, objective: str, inflight: int, exact: Callable[[Problem], Plan]) -> Plan:
    """Near-identical blocks (measured profiles): exact plans of the bracketing problems, the
    best one that is valid for the real problem, and the lower bound from `lo`."""
    lo, hi = bracket(problem)
    try:
        bound_plan = exact(lo)
    except InfeasibleError:
        raise problem.infeasible() from None
    best = None
    for source in (hi, lo):
        try:
            stages = exact(source).stages
            cand = evaluate(problem, stages, inflight, objective=objective, strategy="ours", method="bracketed")
        except (InfeasibleError, ValueError):
            continue
        if best is None or _value(cand, objective) < _value(best, objective):
            best = cand
    if best is None:
        return plan_bounded(problem, objective, inflight)
    bound = _value(bound_plan, objective)
    gap = max(0.0, (_value(best, objective) - bound) / bound) if bound > 0 else 0.0
    return Plan(**{**best.__dict__, "gap": gap, "notes": (
        f"blocks differ by up to {block_spread(problem):.1%}: planned on identical-block brackets, "
        f"within {gap:.2%} of the proven lower bound {bound:.6g} s",)})


def _value(p: Plan, objective: str) -> float:
    return {"latency": p.latency_s, "throughput": p.bottleneck_s, "cycle": p.cycle_s}[objective]
