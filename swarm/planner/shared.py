"""Exact R*(tau) for identical blocks on one shared network (every device behind one switch
or access point: every hop costs c, every return r), for any number of distinct devices.

Order no longer matters: a plan with the source and k other devices costs
    compute + k * c + r   (r only if the last stage is not the source),
so the choice is which devices take part and how many blocks each runs. A knapsack over
the devices with a flag "the last (head) device is chosen" gives it exactly:
    f_flag[n] = least cost of n blocks on the devices seen so far,
    middle device d: + c + tf_d + tb_d * x, 1 <= x <= cap_d;  last device d: + c + r + th_d + tb_d * x, 0 <= x <= capL_d
(tf_d: the device's fixed per-step cost in a multi-stage plan; th_d and the source's te include it)
O(M * B^2) per call (vectorised over n), so 64 distinct devices x 80 blocks take milliseconds.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from swarm.planner.blocks import BlocksOracle, BlockStructure
from swarm.planner.plan import PlannedStage
from swarm.planner.problem import Problem
from swarm.planner.search import fits


def shared_network(problem: Problem) -> bool:
    """True if every link between two distinct devices has the same bandwidth and latency."""
    off = ~np.eye(problem.n_devices, dtype=bool)
    if problem.n_devices < 2:
        return False
    return bool(np.ptp(problem.bandwidth[off]) == 0 and np.ptp(problem.latency[off]) == 0
                and problem.bandwidth[off][0] > 0)


class SharedOracle(BlocksOracle):
    def __init__(self, problem: Problem, st: BlockStructure):
        self.problem, self.st = problem, st
        self.order = [problem.source] + [d for d in range(problem.n_devices) if d != problem.source]
        self.counts = np.ones(len(self.order), dtype=np.int64)
        self._per_type(self.order)
        m = len(self.order)
        self.c = float(problem.hop_time(st.block_out)[self.order[0], self.order[1]])
        self.hop = np.where(np.eye(m, dtype=bool), np.inf, self.c)
        self.hop[:, 0] = np.inf  # nothing hops back into the source but the return

    def solve(self, tau: float) -> tuple[float, Callable[[], list[PlannedStage]] | None]:
        best, how = np.inf, None
        if self.src_fits_all and fits(self.total_src, tau):
            best, how = self.total_src, "alone"
        regular, last, cap_s = self._caps(tau)
        nb = self.st.n_blocks
        if fits(self.c, tau) and cap_s >= 0:
            f0 = np.full(nb + 1, np.inf)
            f0[0] = 0.0
            f1 = np.full(nb + 1, np.inf)
            picks = []  # per device: (x as middle from f0, x as middle from f1, x as last from f0, which f1 won)
            for d in range(1, len(self.order)):
                g0, x0 = _add(f0, self.tb[d], 1, regular[d], self.c + self.tf[d])
                g1, x1 = _add(f1, self.tb[d], 1, regular[d], self.c + self.tf[d])
                r = self.ret[d] if fits(self.ret[d], tau) else np.inf
                h1, xl = _add(f0, self.tb[d], 0, last[d], self.c + r + self.th[d])
                new1 = np.minimum(np.minimum(f1, g1), h1)
                src1 = np.where(new1 == f1, 0, np.where(new1 == g1, 1, 2))
                picks.append((np.where(g0 < f0, x0, -1), x1, xl, src1))
                f0, f1 = np.minimum(f0, g0), new1
            xs = np.arange(min(cap_s, nb) + 1)
            tot = self.te[0] + self.tb[0] * xs + f1[nb - xs]
            k = int(np.argmin(tot))
            if tot[k] < best:
                best, how = float(tot[k]), (int(xs[k]), picks)
        if how is None:
            return np.inf, None
        return best, lambda: self._stages(how)

    def _stages(self, how) -> list[PlannedStage]:
        n = self.problem.n_units
        if how == "alone":
            return [PlannedStage(self.problem.source, 0, n)]
        xs, picks = how
        blocks, flag = self.st.n_blocks - xs, 1
        middles, last = [], None
        for d in range(len(self.order) - 1, 0, -1):
            g0x, g1x, lx, src1 = picks[d - 1]
            if flag == 1:
                kind = int(src1[blocks])
                if kind == 1:
                    middles.append((d, int(g1x[blocks])))
                    blocks -= int(g1x[blocks])
                elif kind == 2:
                    last = (d, int(lx[blocks]))
                    blocks -= last[1]
                    flag = 0
            elif g0x[blocks] >= 0:
                middles.append((d, int(g0x[blocks])))
                blocks -= int(g0x[blocks])
        stages, pos = [PlannedStage(self.problem.source, 0, 1 + xs)], 1 + xs
        for d, x in middles + [(last[0], last[1] + 1)]:
            stages.append(PlannedStage(self.order[d], pos, pos + x))
            pos += x
        return stages


def _add(f: np.ndarray, price: float, lo: int, cap: int, fixed: float) -> tuple[np.ndarray, np.ndarray]:
    """out[n] = min over lo <= x <= cap of f[n - x] + price * x + fixed, and the best x."""
    nb = len(f) - 1
    cap = min(int(cap), nb)
    if cap < lo:
        return np.full(nb + 1, np.inf), np.full(nb + 1, -1)
    win = sliding_window_view(np.concatenate([np.full(cap, np.inf), f]), cap + 1)  # win[n, k] = f[n - cap + k]
    x = cap - np.arange(cap + 1)
    cost = win + np.where(x >= lo, price * x, np.inf)[None]
    k = np.argmin(cost, axis=1)
    return cost[np.arange(nb + 1), k] + fixed, x[k]
