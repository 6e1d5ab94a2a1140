"""The paper's Algorithms 1 and 2 as stated (section IV), for comparison.

Algorithm 1 (latency) is the DP over (layer, device) of Eq. (7) with one running memory
counter per device, decremented whenever DP(i, j) improves, whichever predecessor path
that belongs to. That can prune feasible plans, let a device reappear (A, B, A), or let
the chosen path overflow a device's memory. Its result is returned with those flaws, so
a caller can see them: PaperPlan.stages may be invalid, .problems says why.

Algorithm 2 (throughput) is the DP g(i, S, k) of Eq. (12) over layers, device subsets and
last device, O(N^2 2^M M^2). It ignores the hop that returns the token to the source.
Two readings are needed to run it: g(i, S, k) covers the first i units (the pseudocode
mixes "first i" and "up to i"), and line 15 compares with the target entry g(m, S', j)
(as printed it compares with the source entry g(i, S, k), which would keep almost nothing).
Vectorised over (S, k) with numpy so 12 devices take seconds, not hours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from swarm.planner.plan import PlannedStage, check_stages
from swarm.planner.problem import Problem, fmt_bytes


@dataclass(frozen=True)
class PaperPlan:
    """What a paper algorithm returned: per-unit devices, merged stages, its own objective value."""

    assignment: tuple[int, ...]  # device of each unit
    stages: tuple[PlannedStage, ...]  # consecutive equal devices merged
    value: float  # the algorithm's own objective value (Alg. 2: without the return hop)
    problems: tuple[str, ...]  # why the plan is invalid under the real constraints; empty if valid


def _merge(assignment: list[int]) -> tuple[PlannedStage, ...]:
    stages, start = [], 0
    for i in range(1, len(assignment) + 1):
        if i == len(assignment) or assignment[i] != assignment[start]:
            stages.append(PlannedStage(assignment[start], start, i))
            start = i
    return tuple(stages)


def _diagnose(problem: Problem, stages: tuple[PlannedStage, ...]) -> tuple[str, ...]:
    issues = []
    seen: set[int] = set()
    for s in stages:
        if s.device in seen:
            issues.append(f"device {problem.device_names[s.device]} runs two separate ranges")
        seen.add(s.device)
    pm = problem.prefix_mem()
    used: dict[int, float] = {}
    for s in stages:
        used[s.device] = used.get(s.device, 0.0) + pm[s.end] - pm[s.start]
    for d, u in used.items():
        if u > problem.device_mem[d] * (1 + 1e-12):
            issues.append(f"device {problem.device_names[d]} needs {fmt_bytes(u)} "
                          f"of its {fmt_bytes(problem.device_mem[d])}")
    if not issues:
        try:
            check_stages(problem, stages)
        except ValueError as e:
            issues.append(str(e))
    return tuple(issues)


def algorithm1(problem: Problem) -> PaperPlan | None:
    """Alg. 1 exactly as printed, memory counter included; None if its table has no path."""
    n, m, src = problem.n_units, problem.n_devices, problem.source
    hops = problem.cut_hops()  # hops[i, k, j]: payload out[i-1], the activations of unit i-1
    ret = problem.return_time()
    mem = problem.device_mem.copy()
    req = problem.layer_mem
    dp = np.full((n, m), np.inf)
    choice = np.full((n, m), -1)
    dp[0, src] = problem.time[src, 0]
    choice[0, src] = src
    for i in range(1, n):
        for j in range(m):
            if mem[j] <= req[i]:
                continue
            for k in range(m):
                comm = 0.0 if k == j else hops[i, k, j]
                t_total = dp[i - 1, k] + problem.time[j, i] + comm + (ret[j] if i == n - 1 else 0.0)
                if t_total <= dp[i, j]:
                    dp[i, j] = t_total
                    mem[j] -= req[i]  # line 13: "Update memory Mem_j"
                    choice[i, j] = k
    if n == 1:
        dp[0, src] += ret[src]
    last = int(np.argmin(dp[n - 1]))
    if not np.isfinite(dp[n - 1, last]):
        return None
    assignment = [last]
    for i in range(n - 1, 0, -1):
        assignment.append(int(choice[i, assignment[-1]]))
    assignment.reverse()
    stages = _merge(assignment)
    return PaperPlan(tuple(assignment), stages, float(dp[n - 1, last]), _diagnose(problem, stages))


def algorithm2(problem: Problem) -> PaperPlan | None:
    """Alg. 2 (min bottleneck over subsets, no return hop); None if no plan fits memory."""
    n, m, src = problem.n_units, problem.n_devices, problem.source
    pt, pm = problem.prefix_time(), problem.prefix_mem()
    hops = problem.cut_hops()
    full = 1 << m
    masks = np.arange(full)
    member = (masks[:, None] >> np.arange(m)[None, :]) & 1  # [S, k]
    g = np.full((n + 1, full, m), np.inf)  # g[i, S, k]: first i units done by S, k last
    ch_i = np.full((n + 1, full, m), -1, dtype=np.int16)
    ch_k = np.full((n + 1, full, m), -1, dtype=np.int16)
    for first in range(1, n + 1):  # the source's first segment [0, first) (privacy: unit 0 on source)
        if pm[first] <= problem.device_mem[src]:
            g[first, 1 << src, src] = pt[src, first]
    for i in range(1, n):
        gi = np.where(member.astype(bool), g[i], np.inf)  # [S, k]
        if not np.isfinite(gi).any():
            continue
        for mm in range(i + 1, n + 1):
            seg_mem = pm[mm] - pm[i]
            for j in range(m):
                if problem.device_mem[j] < seg_mem:  # line 8
                    continue
                comp = pt[j, mm] - pt[j, i]
                t_max = np.maximum(np.maximum(gi, hops[i, :, j][None, :]), comp)  # [S, k]
                t_max[member[:, j].astype(bool)] = np.inf  # j must be new
                best_k = np.argmin(t_max, axis=1)
                val = t_max[masks, best_k]
                new = masks | (1 << j)
                ok = np.isfinite(val) & (val <= g[mm, new, j])
                tgt = new[ok]
                g[mm, tgt, j] = val[ok]
                ch_i[mm, tgt, j] = i
                ch_k[mm, tgt, j] = best_k[ok]
    flat = int(np.argmin(g[n]))
    s, last = divmod(flat, m)
    value = float(g[n, s, last])
    if not np.isfinite(value):
        return None
    stages, b = [], n
    while True:
        i = int(ch_i[b, s, last])
        if i < 0:
            stages.append(PlannedStage(last, 0, b))
            break
        stages.append(PlannedStage(last, i, b))
        s, last, b = s & ~(1 << last), int(ch_k[b, s, last]), i
    stages.reverse()
    return PaperPlan(tuple(d.device for d in stages for _ in range(d.start, d.end)), tuple(stages), value,
                     _diagnose(problem, tuple(stages)))
