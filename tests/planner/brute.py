"""Brute force over every plan of a small problem: the reference the planners must match."""

from __future__ import annotations

import itertools

import numpy as np

from swarm.planner.problem import Problem


def all_plans(problem: Problem) -> list[tuple[float, float, tuple]]:
    """(R, P, stages) for every valid plan; stages as (device, start, end) triples.

    A stage's time is its units' times plus its device's step constant, plus its hop
    overhead when the plan has two or more stages (issue 26), written out here
    independently of swarm.planner.plan.evaluate."""
    n, src = problem.n_units, problem.source
    pt, pm = problem.prefix_time(), problem.prefix_mem()
    hops, ret = problem.cut_hops(), problem.return_time()
    others = [d for d in range(problem.n_devices) if d != src]
    out = []
    for k in range(1, min(problem.n_devices, n) + 1):
        for cuts in itertools.combinations(range(1, n), k - 1):
            bounds = (0, *cuts, n)
            for rest in itertools.permutations(others, k - 1):
                devs = (src, *rest)
                r, p, ok = 0.0, 0.0, True
                hop_cost = problem.hop_overhead if k > 1 else 0.0 * problem.hop_overhead
                for i, d in enumerate(devs):
                    a, b = bounds[i], bounds[i + 1]
                    if pm[b] - pm[a] > problem.device_mem[d] * (1 + 1e-12):
                        ok = False
                        break
                    c = pt[d, b] - pt[d, a] + problem.step_overhead[d] + hop_cost[d]
                    h = hops[b, d, devs[i + 1]] if i + 1 < k else ret[d]
                    r += c + h
                    p = max(p, c, h)
                if ok and np.isfinite(r):
                    out.append((r, p, tuple((d, bounds[i], bounds[i + 1]) for i, d in enumerate(devs))))
    return out


def optimum(plans, objective: str, m: int = 1) -> float:
    if not plans:
        return float("inf")
    if objective == "latency":
        return min(r for r, _, _ in plans)
    if objective == "throughput":
        return min(p for _, p, _ in plans)
    return min(max(r / m, p) for r, p, _ in plans)
