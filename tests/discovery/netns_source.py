"""A source run inside a network namespace by test_netns.py: for each line on stdin it
prints one JSON line {"problem": ..., "plan": ...} planned over the live swarm."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import torch

from swarm.discovery.links import ProbeConfig
from swarm.discovery.liveness import LivenessConfig
from swarm.source import SourceConfig, SwarmSource


async def main(interface: str, profile_path: str, min_peers: int, probe_interval: float) -> None:
    config = SourceConfig(interfaces=[interface], profile=json.loads(open(profile_path).read()), min_peers=min_peers,
                          liveness=LivenessConfig(interval_s=0.5), probe=ProbeConfig(interval_s=probe_interval))
    async with SwarmSource(config) as source:
        print(json.dumps({"ready": source.peer_id}), flush=True)
        loop = asyncio.get_running_loop()
        while await loop.run_in_executor(None, sys.stdin.readline):
            planned = await source.plan()
            print(json.dumps({"problem": planned.problem, "plan": planned.plan.to_json()}), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # stderr, for debugging
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
