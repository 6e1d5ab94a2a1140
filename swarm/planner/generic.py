"""Exact R*(tau) for any units: DP over (type counts, last type) with a vector over units.

L(state + v, v, b) = min over u, a of L(state, u, a) + hop(u -> v, cut at a) + C_v(a, b) + F_v,
keeping only stages and hops <= tau and segments that fit in memory (F_v: the device's fixed
per-step costs in a multi-stage plan; the source alone pays only its step constant). Each device is charged
once for its contiguous segment (what the paper's Algorithm 1 gets wrong). Cost
O(states * T^2 * N^2): exact for any links, fast with few types or few devices.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from swarm.planner.plan import PlannedStage
from swarm.planner.problem import Problem
from swarm.planner.search import candidate_values, fits
from swarm.planner.types import TypeSpace, assign_devices


def type_costs(problem: Problem, space: TypeSpace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """seg[T, a, b] (inf if a >= b or over memory; fixed per-step costs of a multi-stage plan
    included), hop[N+1, T, T] (cut at a), ret[T], type 0 = source."""
    n = problem.n_units
    reps = space.reps
    pt = problem.prefix_time()[reps]  # [T, N+1]
    pm = problem.prefix_mem()
    ok = (np.arange(n + 1)[:, None] < np.arange(n + 1)[None, :])[None] & (
        (pm[None, :] - pm[:, None])[None] <= problem.device_mem[reps][:, None, None] * (1 + 1e-12))
    fixed = problem.stage_overhead()[reps]
    seg = np.where(ok, pt[:, None, :] - pt[:, :, None] + fixed[:, None, None], np.inf)
    hops = problem.cut_hops()  # [N+1, M, M]
    t = space.n_types
    hop = np.full((n + 1, t, t), np.inf)
    for u in range(t):
        for v in range(1, t):
            p = space.pair(u, v)
            if p is not None:
                hop[1:, u, v] = hops[1:, p[0], p[1]]
    return seg, hop, problem.return_time()[reps]


def alone_time(problem: Problem, seg: np.ndarray) -> float:
    """The plan "the source runs everything" (inf if it does not fit); seg as type_costs gives it."""
    return problem.alone_time() if np.isfinite(seg[0, 0, problem.n_units]) else np.inf


class GenericOracle:
    """R*(tau) over a type space; the plain subset DP when every device is its own type."""

    def __init__(self, problem: Problem, space: TypeSpace):
        self.problem, self.space = problem, space
        self.seg, self.hop, self.ret = type_costs(problem, space)
        self.alone = alone_time(problem, self.seg)

    def candidates(self) -> np.ndarray:
        return candidate_values(self.seg, self.hop, self.ret, [self.alone])

    def solve(self, tau: float) -> tuple[float, Callable[[], list[PlannedStage]] | None]:
        sp, n = self.space, self.problem.n_units
        t = sp.n_types
        seg = np.where(fits(self.seg, tau), self.seg, np.inf)
        hop = np.where(fits(self.hop, tau), self.hop, np.inf)
        L = np.full((sp.n_states, t, n + 1), np.inf)
        par_u = np.zeros((sp.n_states, t, n + 1), dtype=np.int32)
        par_a = np.zeros((sp.n_states, t, n + 1), dtype=np.int32)
        L[0, 0] = seg[0, 0]
        L[0, 0, n] = self.alone if fits(self.alone, tau) else np.inf  # one stage: no hop overhead
        for layer in sp.layers[:-1]:
            block = L[layer]  # [s, T, N+1]
            if not np.isfinite(block).any():
                continue
            for v in range(1, t):
                sel = layer[sp.digits[layer, v] < sp.counts[v]]
                if len(sel) == 0:
                    continue
                x = L[sel] + hop[:, :, v].T[None]  # [s, u, a]
                bu = np.argmin(x, axis=1)  # [s, a]
                xm = np.take_along_axis(x, bu[:, None, :], axis=1)[:, 0]  # [s, a]
                z = xm[:, :, None] + seg[v][None]  # [s, a, b]
                ba = np.argmin(z, axis=1)  # [s, b]
                val = np.take_along_axis(z, ba[:, None, :], axis=1)[:, 0]
                new = sel + sp.strides[v]
                better = val < L[new, v]
                L[new, v] = np.where(better, val, L[new, v])
                par_a[new, v] = np.where(better, ba, par_a[new, v])
                par_u[new, v] = np.where(better, np.take_along_axis(bu, ba, axis=1), par_u[new, v])
        ret = np.where(fits(self.ret, tau), self.ret, np.inf)
        total = L[:, :, n] + ret[None]
        flat = int(np.argmin(total))
        best = float(total.flat[flat])
        if not np.isfinite(best):
            return np.inf, None
        state, last = divmod(flat, t)

        def build() -> list[PlannedStage]:
            st, u, b = state, last, n
            rev: list[tuple[int, int, int]] = []
            while not (st == 0 and u == 0):
                a = int(par_a[st, u, b])
                rev.append((u, a, b))
                st, u, b = st - int(sp.strides[u]), int(par_u[st, u, b]), a
            rev.append((0, 0, b))
            rev.reverse()
            devices = assign_devices(sp, [r[0] for r in rev])
            return [PlannedStage(d, a, b) for d, (_, a, b) in zip(devices, rev)]

        return best, build
