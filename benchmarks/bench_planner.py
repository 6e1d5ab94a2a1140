"""Planner speed: the issue-3 targets, measured in one run on this machine.

1. 15 distinct devices x 34 units (the paper's testbed, Llama2-7B, links with 20% variance):
   each objective, target < 1 s.
2. 64 devices x 82 units (Llama2-70B) in 5 device types on per-type-pair links:
   each objective, target < 2 s; and 64 distinct devices on one shared network.
3. The paper's Algorithm 2 (vectorised with numpy) against ours on the testbed cut to 10 and
   12 devices, return hop made negligible so both optimise the same thing: same optimum,
   speedup = their time / ours (target >= 50x at 12 devices).

    python benchmarks/bench_planner.py [--json] [--repeat 3] [--skip-paper]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import numpy as np

from swarm.planner import plan
from swarm.planner.problem import Problem
from swarm.planner.roofline import DeviceSpec, load_testbed, testbed, unit_layers, unit_times
from swarm.planner.strategies import restrict

OBJECTIVES = (("latency", 1), ("throughput", 1), ("cycle", 8))
# A fifth device kind for the 64-device swarm (not in the paper): Jetson Orin Nano 8GB.
ORIN_NANO = DeviceSpec("orin-nano-8gb", 8e9 * 0.9, 1.28e12, 68e9)


def timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def swarm64() -> Problem:
    """64 devices in 5 types: source AGX, 30 AGX, 20 NX, 8 RTX 3090, 5 Orin Nano; Llama2-70B."""
    tb = load_testbed()
    model = tb.models["llama2-70b"]
    kinds = ["agx-orin-32gb"] * 31 + ["orin-nx-16gb"] * 20 + ["rtx-3090"] * 8 + ["orin-nano"] * 5
    specs = {**tb.devices, "orin-nano": ORIN_NANO}
    mbps = {"agx-orin-32gb": 50, "orin-nx-16gb": 50, "rtx-3090": 20, "orin-nano": 10}
    bw = [[0.0 if i == j else min(mbps[a], mbps[b]) * 1e6 / 8 for j, b in enumerate(kinds)]
          for i, a in enumerate(kinds)]
    return Problem.from_json({
        "source": 0, "layers": unit_layers(model, context_total=128),
        "devices": [{"name": f"{k}-{i}", "mem": specs[k].mem_bytes, "time": unit_times(specs[k], model, 1, 1, 80)}
                    for i, k in enumerate(kinds)],
        "bandwidth": bw, "return_bytes": 4})


def shared64() -> Problem:
    """64 distinct devices (AGX-like, speeds and memory spread +-30%) on one 50 Mb/s network; Llama2-70B."""
    tb = load_testbed()
    model, agx = tb.models["llama2-70b"], tb.devices["agx-orin-32gb"]
    rng = np.random.default_rng(64)
    devs = []
    for i in range(64):
        f, g = rng.uniform(0.7, 1.3, 2)
        spec = DeviceSpec(f"dev{i}", agx.mem_bytes * g, agx.flops * f, agx.mem_bandwidth * f)
        devs.append({"name": spec.name, "mem": spec.mem_bytes, "time": unit_times(spec, model, 1, 1, 80)})
    bw = np.full((64, 64), 50e6 / 8)
    np.fill_diagonal(bw, 0)
    return Problem.from_json({"source": 0, "layers": unit_layers(model, context_total=128), "devices": devs,
                              "bandwidth": bw.tolist(), "return_bytes": 4})


def paper_subproblem(k: int) -> Problem:
    """The 7B testbed cut to k devices (source, k-2 AGX/NX, the RTX 3090), return hop ~free."""
    full = testbed("llama2-7b")
    sub, _ = restrict(full, list(range(k - 1)) + [full.n_devices - 1])
    data = sub.to_json()
    data["return_bytes"] = 0.0
    return Problem.from_json(data)


def run(repeat: int, skip_paper: bool) -> dict:
    from swarm.planner import paper

    out: dict = {"cases": []}
    for label, problem, target in (("15 distinct devices x 34 units", testbed("llama2-7b"), 1.0),
                                   ("64 devices x 82 units, 5 types", swarm64(), 2.0),
                                   ("64 distinct devices x 82, one network", shared64(), 2.0)):
        for objective, m in OBJECTIVES:
            secs, p = timed(lambda: plan(problem, objective, inflight=m), repeat)
            out["cases"].append({"case": label, "objective": objective, "inflight": m, "seconds": secs,
                                 "target_s": target, "ok": secs < target, "method": p.method,
                                 "stages": len(p.stages), "latency_s": p.latency_s, "bottleneck_s": p.bottleneck_s,
                                 "cycle_s": p.cycle_s})
    if not skip_paper:
        out["paper_alg2"] = []
        for k in (10, 12):
            prob = paper_subproblem(k)
            ours_s, ours = timed(lambda: plan(prob, "throughput"), repeat)
            theirs_s, theirs = timed(lambda: paper.algorithm2(prob), 1)
            out["paper_alg2"].append({"devices": k, "units": prob.n_units, "ours_s": ours_s, "paper_s": theirs_s,
                                      "speedup": theirs_s / ours_s, "ours_bottleneck_s": ours.bottleneck_s,
                                      "paper_bottleneck_s": theirs.value,
                                      "same_optimum": math.isclose(ours.bottleneck_s, theirs.value, rel_tol=1e-9)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    ap.add_argument("--skip-paper", action="store_true", help="skip Algorithm 2 (slow: seconds to minutes)")
    args = ap.parse_args(argv)
    res = run(args.repeat, args.skip_paper)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    for c in res["cases"]:
        print(f"{c['case']:34s} {c['objective']:10s} m={c['inflight']}: {c['seconds'] * 1e3:8.1f} ms "
              f"(target < {c['target_s']:.0f} s: {'ok' if c['ok'] else 'MISSED'}) [{c['method']}, {c['stages']} stages]")
    for c in res.get("paper_alg2", []):
        print(f"Alg. 2 vs ours, {c['devices']} devices x {c['units']} units: paper {c['paper_s']:.2f} s, "
              f"ours {c['ours_s'] * 1e3:.1f} ms, speedup {c['speedup']:.0f}x, "
              f"same optimum: {c['same_optimum']} ({c['paper_bottleneck_s'] * 1e3:.3f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
