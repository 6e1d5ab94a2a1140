"""Random small problems for cross-checks: heterogeneous, some memory-infeasible, links missing."""

from __future__ import annotations

import numpy as np

from swarm.planner.problem import Problem


def random_problem(rng: np.random.Generator, identical_blocks: bool = False, types: bool = False,
                   overheads: bool = False) -> Problem:
    """A random problem; with overheads, devices have non-zero fixed per-step costs (a step
    constant and a hop overhead, each up to about a unit's time) as measured peers do."""
    m = int(rng.integers(1, 6))
    n = int(rng.integers(3 if identical_blocks else 1, 9))
    if identical_blocks:
        mem = np.r_[rng.uniform(0.5, 2), np.full(n - 2, rng.uniform(0.5, 2)), rng.uniform(0.5, 2)]
        out = np.r_[np.full(n - 1, rng.uniform(1, 5)), rng.uniform(0.1, 5)]
    else:
        mem, out = rng.uniform(0.5, 2, n), rng.uniform(0.1, 5, n)
    speed = rng.uniform(0.2, 3, m)
    kinds = rng.integers(0, min(2, m), m) if types else np.arange(m)
    speed = speed[kinds]
    unit = rng.uniform(0.5, 1.5, n)
    if identical_blocks:
        unit[1:-1] = unit[1]
    time = speed[:, None] * unit[None, :]
    dev_mem = rng.uniform(0.3, 1.2, m) * mem.sum() * rng.choice([0.7, 1.5, 3.0])
    dev_mem = dev_mem[kinds] if types else dev_mem
    bw = rng.uniform(0.5, 4, (m, m))
    lat = rng.uniform(0, 0.3, (m, m))
    if types:  # one shared network
        bw[:], lat[:] = bw[0, 0], lat[0, 0]
    else:
        bw[rng.random((m, m)) < 0.2] = 0.0
    src = int(rng.integers(0, m))
    step_oh, hop_oh = np.zeros(m), np.zeros(m)
    if overheads:
        step_oh, hop_oh = rng.uniform(0, 0.5, m)[kinds], rng.uniform(0, 1.5, m)[kinds]
    return Problem.from_json({
        "source": src,
        "layers": [{"name": f"u{i}", "mem": float(mem[i]), "out": float(out[i])} for i in range(n)],
        "devices": [{"name": f"d{j}", "mem": float(dev_mem[j]), "time": time[j].tolist(),
                     "step_overhead": float(step_oh[j]), "hop_overhead": float(hop_oh[j])} for j in range(m)],
        "bandwidth": bw.tolist(), "latency": lat.tolist(),
        "return_bytes": float(rng.uniform(0, 2)),
    })
