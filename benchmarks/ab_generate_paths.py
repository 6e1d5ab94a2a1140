"""What `swarm generate` pays for running through the Pipeline: the source-only pipeline
(its path since issue 24, the same as chat and serve) beside the old in-process loop
(``LocalChain.stream_generate``), on one and the same loaded shard.

The default model (or --model), one torch thread, a 32-token prompt, --new tokens,
greedy. Each round runs both paths once, in alternating order, so noise and drift land
on both; medians of the per-token decode time (after the first token) and of the time
to the first token are printed, with the load average.

    python benchmarks/ab_generate_paths.py [--rounds 7] [--new 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import torch

from swarm.cli.backend import source_only_pipeline
from swarm.model.local import LocalChain, stream_generate
from swarm.model.shard import Shard
from swarm.model.store import resolve_model
from swarm.model.units import ModelLayout

PROMPT = list(range(100, 132))


def time_local(chain: LocalChain, new: int) -> tuple[float, float]:
    began = time.perf_counter()
    first = None
    for _ in stream_generate(chain, [PROMPT], new):
        first = first or time.perf_counter() - began
    return first, (time.perf_counter() - began - first) / (new - 1)


async def time_pipeline(pipeline, new: int) -> tuple[float, float]:
    began = time.perf_counter()
    first = None
    async for _ in pipeline.generate(PROMPT, new):
        first = first or time.perf_counter() - began
    return first, (time.perf_counter() - began - first) / (new - 1)


async def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model = resolve_model(args.model)
    units = ModelLayout.read(model).num_units
    max_len = len(PROMPT) + args.new
    shard = Shard.load(model, 0, units, max_slots=1, max_len=max_len)
    chain = LocalChain([shard])
    got: dict[str, list[tuple[float, float]]] = {"local loop": [], "pipeline": []}
    async with source_only_pipeline(model, max_len=max_len, first_shard=shard) as pipeline:
        await time_pipeline(pipeline, 4)  # warm both paths once
        time_local(chain, 4)
        for r in range(args.rounds):
            for name in (("local loop", "pipeline") if r % 2 == 0 else ("pipeline", "local loop")):
                got[name].append(time_local(chain, args.new) if name == "local loop"
                                 else await time_pipeline(pipeline, args.new))
    print(f"load average {os.getloadavg()}, {args.rounds} rounds, {args.new} new tokens, {args.threads} thread(s)")
    base = statistics.median(t for _, t in got["local loop"])
    for name, runs in got.items():
        ms = statistics.median(t for _, t in runs) * 1000
        ttft = statistics.median(f for f, _ in runs) * 1000
        print(f"{name:>10}: {ms:6.2f} ms/token (x{ms / 1000 / base:.3f}), first token {ttft:6.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    asyncio.run(main(parser.parse_args()))
