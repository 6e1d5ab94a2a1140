"""The source of an emulated home network, run in its namespace and CPU cgroup by
benchmarks/testbed.py and tests/discovery/test_homenet.py. One JSON request per stdin
line, one JSON answer per stdout line:

    {"op": "problem"}          the planner problem over the live swarm as measured now, plus
                               every device's per-unit prefill and decode times
    {"op": "run", "stages": [[peer_id | null, start, end], ...], "micro_batches": m,
     "batch_size": b, "mode": "no-bubbles" | "bubbles", "prompts": [[ids]] | null,
     "prompt_tokens": 32, "new_tokens": 96}
                               deploy exactly these stages, generate, tear down: tokens and timings
    {"op": "generate", "prompt": [ids], "new_tokens": n}
                               through SwarmSource.generate (re-planned when peers or links changed)

    python bootstrap/netns/source_agent.py INTERFACE NAME MIN_PEERS PROBE_INTERVAL_S [MEM_BYTES]
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time

import torch

from swarm.discovery.links import ProbeConfig
from swarm.discovery.liveness import LivenessConfig
from swarm.bench.pipeline import bench_prompts
from swarm.runtime.deploy import StagePlacement
from swarm.runtime.engine import Pipeline, PipelineConfig
from swarm.runtime.schedule import Layout, Mode
from swarm.runtime.wire import Kind
from swarm.model.units import ModelLayout
from swarm.source import SourceConfig, SwarmSource


# The emulated links go down to a fraction of a Mbit/s. A probe of the default size
# (64 + 256 KiB, three rounds) takes many seconds there, and the heartbeats to that peer
# wait behind it on the same connection: so smaller probes (the htb burst is one MTU,
# far below them) and a liveness that tolerates a few seconds' wait.
PROBE_BYTES = 16 * 1024
LIVENESS = LivenessConfig(interval_s=1.0, timeout_s=4.0, misses=5)


async def unit_times(source: SwarmSource, problem: dict) -> dict:
    """peer id -> per-unit prefill and decode seconds (the problem itself has only their mean)."""
    out = {source.peer_id: {"prefill_s": [u["prefill_s"] for u in source.profile["units"]],
                            "decode_s": [u["decode_s"] for u in source.profile["units"]]}}
    for pid in problem["peer_ids"][1:]:
        rec = source.directory.live[pid]
        a = rec.announcement
        if a.summarised:
            info = (await source.directory.client(rec.host, rec.port).request(Kind.INFO))["info"]["profile"]
            out[pid] = {"prefill_s": [u["prefill_s"] for u in info["units"]],
                        "decode_s": [u["decode_s"] for u in info["units"]]}
        else:
            out[pid] = {"prefill_s": [x / 1e6 for x in a.prefill_us], "decode_s": [x / 1e6 for x in a.decode_us]}
    return out


async def run_stages(source: SwarmSource, req: dict) -> dict:
    live = source.directory.live
    stages = tuple(StagePlacement(None if pid is None else f"tcp://{live[pid].host}:{live[pid].port}", a, b)
                   for pid, a, b in req["stages"])
    m, b = int(req.get("micro_batches", 1)), int(req.get("batch_size", 1))
    new = int(req["new_tokens"])
    prompts = req.get("prompts") or bench_prompts(m * b, int(req["prompt_tokens"]),
                                                   ModelLayout.read(source.model_dir).vocab_size)
    config = PipelineConfig(source.model_dir, stages, layout=Layout(m, b), mode=Mode(req.get("mode", "no-bubbles")),
                            max_len=len(prompts[0]) + new + 8)
    # The source's prober does not see this pipeline's steps (SwarmSource defers its refreshes
    # only while its own pipeline runs): pause it, or its probes queue in front of the tokens.
    with source.prober.paused():
        async with Pipeline(config) as pipe:
            await pipe.stage_stats()  # from here on
            began = time.perf_counter()
            stamps: list[list[float]] = [[] for _ in prompts]
            tokens: list[list[int]] = [[] for _ in prompts]

            async def one(i: int) -> None:
                async for token in pipe.generate(prompts[i], new):
                    stamps[i].append(time.perf_counter() - began)
                    tokens[i].append(token)

            async with asyncio.TaskGroup() as tg:
                for i in range(len(prompts)):
                    tg.create_task(one(i))
            elapsed = time.perf_counter() - began
            stats = await pipe.stage_stats()
    per_token = [(s[-1] - s[0]) / (len(s) - 1) for s in stamps if len(s) > 1]
    return {"tokens": tokens, "elapsed_s": elapsed, "first_token_s": [s[0] for s in stamps],
            "decode_s_per_token": per_token, "tokens_per_s": sum(map(len, tokens)) / elapsed,
            "busy_share": [s.busy_share for s in stats], "load": os.getloadavg()}


async def main(interface: str, name: str, min_peers: int, probe_interval: float, mem: int | None) -> None:
    config = SourceConfig(interfaces=[interface], name=name, min_peers=min_peers, mem_bytes=mem, liveness=LIVENESS,
                          probe=ProbeConfig(interval_s=probe_interval, min_bytes=PROBE_BYTES, max_bytes=PROBE_BYTES))
    async with SwarmSource(config) as source:
        print(json.dumps({"ready": source.peer_id}), flush=True)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            req = json.loads(line)
            try:
                if req["op"] == "problem":
                    problem = await source.problem()
                    answer = {"problem": problem, "unit_times": await unit_times(source, problem)}
                elif req["op"] == "run":
                    answer = await run_stages(source, req)
                elif req["op"] == "generate":
                    before = source.current
                    tokens = [t async for t in source.generate(req["prompt"], int(req["new_tokens"]))]
                    now = source.current
                    answer = {"tokens": tokens, "replanned": before is not None and now is not before,
                              "stages": [[now.problem["peer_ids"][s.device], s.start, s.end] for s in now.plan.stages]}
                else:
                    answer = {"error": f"unknown op {req['op']!r}"}
            except Exception as exc:  # answer, and keep serving: the driver decides
                logging.exception("request %s failed", req.get("op"))
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # stderr: the run's log
    args = sys.argv[1:]
    asyncio.run(main(args[0], args[1], int(args[2]), float(args[3]), int(args[4]) if len(args) > 4 else None))
