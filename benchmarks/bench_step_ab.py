"""One shard's decode step, A/B in one process: another revision's step code (A) against this tree's (B).

The shard is loaded once (this tree's loader and kernels); round by round the step's Python
code is swapped between the two revisions (``Shard.step``, ``SlotKVCache.begin_step`` /
``update``, ``Block.forward``, ``Projections.forward``, ``Linear.forward`` and the native
kernels' ``matmul_parts`` / ``matmul_bf16``, read from ``git show REV:...``), so both run
on the same weights, the same built kernels and the same machine load. Each round prefills
a 32-token prompt and times 24 decode steps on the thread's CPU clock; medians are printed
with the ratio B/A and whether both produced the same tokens. Only for revisions whose
objects have the attributes the swapped functions use (e.g. HEAD~1 of a change to them).

    python benchmarks/bench_step_ab.py --base HEAD~1 [--formats float32,int4,int8,bfloat16] [--rounds 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import types

import torch

from swarm.model import block, kernels, shard
from swarm.model.kernels import native
from swarm.model.local import LocalChain
from swarm.model.store import resolve_model
from swarm.model.units import ModelLayout

FORMATS = {"float32": ("float32", None), "bfloat16": ("bfloat16", None), "int8": ("float32", "int8"),
           "int4": ("float32", "int4")}
SWAPPED = [(shard.Shard, "step"), (shard.SlotKVCache, "begin_step"), (shard.SlotKVCache, "update"),
           (block.Block, "forward"), (block.Projections, "forward"), (kernels.Linear, "forward"),
           (native.NativeKernels, "matmul_parts"), (native.NativeKernels, "matmul_bf16")]
FILES = {"Shard": "swarm/model/shard.py", "SlotKVCache": "swarm/model/shard.py", "Block": "swarm/model/block.py",
         "Projections": "swarm/model/block.py", "Linear": "swarm/model/kernels/__init__.py",
         "NativeKernels": "swarm/model/kernels/native.py"}
STEPS = 24


def module_at(rev: str, path: str) -> types.ModuleType:
    """``path`` as it was at ``rev``, imported under a name of its own."""
    name = f"_ab_{rev}_{path}".replace("/", "_").replace(".", "_").replace("~", "_").replace("^", "_")
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__file__ = path
        sys.modules[name] = module
        source = subprocess.check_output(["git", "show", f"{rev}:{path}"], text=True)
        exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
    return sys.modules[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD~1", help="the revision A's step code is read from")
    parser.add_argument("--formats", default="float32,int4,int8,bfloat16")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    versions = {"B": {(c, a): getattr(c, a) for c, a in SWAPPED},
                "A": {(c, a): getattr(getattr(module_at(args.base, FILES[c.__name__]), c.__name__), a)
                      for c, a in SWAPPED}}

    def use(which: str) -> None:
        for (cls, attr), function in versions[which].items():
            setattr(cls, attr, function)

    model_dir = resolve_model(args.model)
    units = ModelLayout.read(model_dir).num_units
    prompt = torch.tensor([list(range(100, 132))])
    print(f"{model_dir.name}, 1 thread, A = {args.base}, B = this tree; load average {os.getloadavg()[0]:.2f}")
    for name in args.formats.split(","):
        dtype, quant = FORMATS[name]
        one = LocalChain.load(model_dir, [(0, units)], max_slots=1, max_len=64, dtype=dtype, quant=quant).shards[0]

        def run() -> tuple[float, list[int]]:
            one.open_slot(0)
            token, times, tokens = one.step([0], prompt), [], []
            for _ in range(STEPS):
                began = time.thread_time()
                token = one.step([0], token[:, None])
                times.append(time.thread_time() - began)
                tokens.append(token.item())
            return statistics.median(times), tokens

        results: dict[str, list[float]] = {"A": [], "B": []}
        tokens: dict[str, list[int]] = {}
        for which in "AB":  # warm-up
            use(which)
            run()
        for r in range(args.rounds):
            for which in ("AB" if r % 2 == 0 else "BA"):
                use(which)
                seconds, tokens[which] = run()
                results[which].append(seconds)
        a, b = statistics.median(results["A"]), statistics.median(results["B"])
        print(f"  {name:9s} A {1000 * a:7.2f} ms  B {1000 * b:7.2f} ms  B/A {b / a:.3f}  "
              f"same tokens {tokens['A'] == tokens['B']}  load average {os.getloadavg()[0]:.2f}", flush=True)
        use("B")


if __name__ == "__main__":
    main()
