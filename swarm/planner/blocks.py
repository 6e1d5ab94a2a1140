"""Exact R*(tau) when the decoder blocks are identical (the usual case: Llama, SmolLM...).

With identical blocks every cut between units 0..N-2 sends the same payload, so a plan's
latency splits into
- communication: a path from the source through the chosen devices (Held-Karp over the
  type count vector, last type kept), hops and return <= tau;
- computation: how many blocks each chosen device runs, which depends only on the set and
  on which device is last (it also runs the head). Each middle device needs >= 1 block,
  every device is capped by memory and by tau, and the cheapest per-block devices take the
  rest: a greedy that is exact for this linear cost with bounds.
Fixed per-step costs (step constant, hop overhead) are per device: a middle device pays
its own for its first block, the source and the last device theirs with the embedding and
the head; the source alone pays only its step constant.
Cost per solve O(states * T^2) instead of O(states * T^2 * N^2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable

import numpy as np

from swarm.planner.plan import PlannedStage
from swarm.planner.problem import Problem
from swarm.planner.search import REL_TOL, candidate_values, fits
from swarm.planner.types import TypeSpace, assign_devices

SAME = 1e-12  # relative spread below which unit figures count as identical


@dataclass(frozen=True)
class BlockStructure:
    n_blocks: int
    block_mem: float
    block_out: float
    embed_mem: float
    head_mem: float


def block_structure(problem: Problem) -> BlockStructure | None:
    """The identical-block layout (embed, B blocks, head) if the problem has one."""
    n = problem.n_units
    if n < 3:
        return None
    mem, out, t = problem.layer_mem, problem.layer_out, problem.time
    blocks = slice(1, n - 1)
    if not (_same(mem[blocks]) and _same(np.append(out[: n - 1], out[0]))):
        return None
    if not all(_same(row[blocks]) for row in t):
        return None
    return BlockStructure(n - 2, float(mem[1]), float(out[1]), float(mem[0]), float(mem[-1]))


def _same(x: np.ndarray) -> bool:
    return bool(np.ptp(x) <= SAME * max(1e-300, float(np.abs(x).max())))


def block_device_key(problem: Problem) -> Callable[[int], Hashable]:
    """Devices with equal memory and block, embedding and head times are interchangeable
    when every block costs the same (the Held-Karp over types)."""
    t = problem.time
    return lambda d: (float(problem.device_mem[d]), float(t[d, 1]), float(t[d, 0]), float(t[d, -1]),
                      float(problem.step_overhead[d]), float(problem.hop_overhead[d]))


def _floor_cap(x: np.ndarray | float, n_blocks: int) -> np.ndarray:
    """Whole blocks that fit in x block-units, with the same slack as fits(); -1 if x < 0."""
    x = np.asarray(x, dtype=float)
    with np.errstate(invalid="ignore"):
        k = np.floor(x * (1 + REL_TOL) + 1e-12)
    k = np.where(np.isnan(k), n_blocks, k)
    return np.clip(k, -1, n_blocks).astype(np.int64)


class BlocksOracle:
    def __init__(self, problem: Problem, space: TypeSpace, st: BlockStructure):
        self.problem, self.space, self.st = problem, space, st
        self.counts = space.counts
        self._per_type(space.reps)
        hop = problem.hop_time(st.block_out)
        tn = space.n_types
        self.hop = np.full((tn, tn), np.inf)
        for u in range(tn):
            for v in range(1, tn):
                p = space.pair(u, v)
                if p is not None:
                    self.hop[u, v] = hop[p]
        self._path_cache: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}

    def _per_type(self, reps: list[int]) -> None:
        """Per-type (or per-device) figures; reps[0] is the source."""
        problem = self.problem
        t = problem.time[reps]
        # tf: a multi-stage plan's fixed per-step cost of each type; te and th carry it for the
        # source (embedding) and the last device (head), a middle device pays it beside its blocks
        self.tf = problem.stage_overhead()[reps]
        self.tb, self.te, self.th = t[:, 1], t[:, 0] + self.tf, t[:, -1] + self.tf
        self.mem = problem.device_mem[reps]
        self.ret = problem.return_time()[reps]
        self.total_src = problem.alone_time()
        self.src_fits_all = problem.layer_mem.sum() <= self.mem[0] * (1 + 1e-12)

    def candidates(self) -> np.ndarray:
        k = np.arange(self.st.n_blocks + 1)[None, :]
        regular = self.tb[:, None] * k
        middle = regular + self.tf[:, None]
        last = regular + self.th[:, None]
        source = self.te[0] + self.tb[0] * k
        return candidate_values(middle[:, 1:], last, source, self.hop, self.ret, [self.total_src])

    def _caps(self, tau: float):
        st, b = self.st, self.st.n_blocks
        with np.errstate(divide="ignore", invalid="ignore"):
            by_mem = lambda free: np.where(free < 0, -1.0, free / st.block_mem if st.block_mem > 0 else np.inf)  # noqa: E731
            by_time = lambda free: np.where(fits(0.0, free), np.where(self.tb > 0, free / self.tb, np.inf), -1.0)  # noqa: E731
            regular = _floor_cap(np.minimum(by_mem(self.mem), by_time(tau - self.tf)), b)
            last = _floor_cap(np.minimum(by_mem(self.mem - st.head_mem), by_time(tau - self.th)), b)
            source = _floor_cap(np.minimum(by_mem(self.mem - st.embed_mem), by_time(tau - self.te)), b)[0]
        last = np.where(fits(self.th, tau) & (self.mem - st.head_mem >= -1e-12 * self.mem), np.maximum(last, -1), -1)
        return regular, last, int(source) if fits(self.te[0], tau) and self.mem[0] >= st.embed_mem else -1

    def compute(self, tau: float, digits: np.ndarray, u: int, want_split: bool = False, caps=None):
        """Least compute time for each state (rows of digits) with last type u (u >= 1)."""
        regular, last, cap_s = caps or self._caps(tau)
        r = digits[:, 1:].copy()  # devices of each type that are neither source nor last
        r[:, u - 1] -= 1
        valid = (digits[:, u] >= 1) & (last[u] >= 0) & (cap_s >= 0)
        if (regular[1:] < 1).any():
            valid &= ~(r[:, regular[1:] < 1] > 0).any(axis=1)
        rem = self.st.n_blocks - r.sum(axis=1)
        valid &= rem >= 0
        cost = self.te[0] + self.th[u] + r @ (self.tb[1:] + self.tf[1:])
        # slots, cheapest per block first: extra blocks beyond each middle device's first one,
        # the source's blocks, the last device's blocks
        prices = np.concatenate([self.tb[1:], [self.tb[0], self.tb[u]]])
        order = np.argsort(prices, kind="stable")
        slot = np.empty((len(r), len(prices)), dtype=np.int64)
        slot[:, :-2] = r * np.maximum(regular[1:] - 1, 0)[None]
        slot[:, -2] = max(cap_s, 0)
        slot[:, -1] = max(last[u], 0)
        slot = slot[:, order]
        before = np.cumsum(slot, axis=1) - slot
        take = np.clip(np.maximum(rem, 0)[:, None] - before, 0, slot)
        valid &= before[:, -1] + slot[:, -1] >= rem
        out = np.where(valid, cost + take @ prices[order], np.inf)
        if not want_split:
            return out
        takes = np.empty_like(take)
        takes[:, order] = take
        return out, takes, regular

    def latency_floor(self, tau: float) -> float:
        """A lower bound on R*(tau), ignoring links and which device is which: the B blocks on the
        cheapest devices up to their caps, the embedding, the cheapest head; inf if they cannot fit."""
        regular, last, cap_s = self._caps(tau)
        if cap_s < 0:
            return np.inf
        alone = self.total_src if fits(self.total_src, tau) and self.src_fits_all else np.inf
        heads = self.th[1:][last[1:] >= 0]
        if len(heads) == 0:
            return alone
        prices = np.concatenate([[self.tb[0]], self.tb[1:]])
        caps = np.concatenate([[cap_s], np.maximum(regular[1:], 0) * self.counts[1:]])
        order = np.argsort(prices)
        before = np.cumsum(caps[order]) - caps[order]
        if before[-1] + caps[order][-1] < self.st.n_blocks:
            return alone
        take = np.clip(self.st.n_blocks - before, 0, caps[order])
        return min(alone, float(self.te[0] + heads.min() + take @ prices[order]))

    def _paths(self, usable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Held-Karp over type counts with the usable hops: least hop sum per (state, last type).

        Only the set of usable hops matters, and nearby taus share it: cache by that mask."""
        key = usable.tobytes()
        if key in self._path_cache:
            return self._path_cache[key]
        sp = self.space
        hop = np.where(usable, self.hop, np.inf)
        hk = np.full((sp.n_states, sp.n_types), np.inf)
        par = np.zeros((sp.n_states, sp.n_types), dtype=np.int32)
        hk[0, 0] = 0.0
        for layer in sp.layers[1:]:  # pull: each state from the states one device smaller
            prev = layer[:, None] - sp.strides[None, :]  # [s, v]
            has = sp.digits[layer] >= 1
            has[:, 0] = False
            x = hk[np.where(has, prev, 0)] + hop.T[None]  # [s, v, u]
            bu = np.argmin(x, axis=2)
            val = np.take_along_axis(x, bu[:, :, None], axis=2)[:, :, 0]
            hk[layer] = np.where(has, val, np.inf)
            par[layer] = bu
        if len(self._path_cache) >= 4:
            self._path_cache.pop(next(iter(self._path_cache)))
        self._path_cache[key] = (hk, par)
        return hk, par

    def solve(self, tau: float) -> tuple[float, Callable[[], list[PlannedStage]] | None]:
        sp = self.space
        tn = sp.n_types
        hk, par = self._paths(fits(self.hop, tau))
        ret = np.where(fits(self.ret, tau), self.ret, np.inf)
        total = np.full((sp.n_states, tn), np.inf)
        if self.src_fits_all and fits(self.total_src, tau):
            total[0, 0] = self.total_src
        caps = self._caps(tau)
        for u in range(1, tn):
            live = np.isfinite(hk[:, u])
            if live.any() and np.isfinite(ret[u]):
                total[live, u] = self.compute(tau, sp.digits[live], u, caps=caps) + hk[live, u] + ret[u]
        flat = int(np.argmin(total))
        best = float(total.flat[flat])
        if not np.isfinite(best):
            return np.inf, None
        state, last = divmod(flat, tn)
        return best, lambda: self._build(tau, state, last, par)

    def _build(self, tau: float, state: int, last: int, par: np.ndarray) -> list[PlannedStage]:
        sp, n = self.space, self.problem.n_units
        if last == 0:
            return [PlannedStage(self.problem.source, 0, n)]
        path, st, u = [], state, last
        while not (st == 0 and u == 0):
            path.append(u)
            st, u = st - int(sp.strides[u]), int(par[st, u])
        path.append(0)
        path.reverse()
        _, takes, regular = self.compute(tau, sp.digits[state : state + 1], last, want_split=True)
        takes = takes[0]
        extra_by_type = {t: int(takes[t - 1]) for t in range(1, sp.n_types)}
        counts = []
        for pos, t in enumerate(path):
            if pos == 0:
                counts.append(int(takes[-2]))
            elif pos == len(path) - 1:
                counts.append(int(takes[-1]))
            else:  # a middle device: one block plus its share of its type's extra blocks
                give = min(extra_by_type[t], max(int(regular[t]) - 1, 0))
                extra_by_type[t] -= give
                counts.append(1 + give)
        devices = assign_devices(sp, path)
        stages, pos = [], 0
        for k, (d, c) in enumerate(zip(devices, counts)):
            start = pos
            pos += c + (1 if k == 0 else 0) + (1 if k == len(devices) - 1 else 0)
            stages.append(PlannedStage(d, start, pos))
        return stages
