"""`swarm join` peers serving the tiny model; the source plans over their announcements,
deploys, answers with the single-process tokens, and re-plans when its peer dies."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys

import pytest

from swarm.discovery.liveness import LivenessConfig
from swarm.discovery.links import ProbeConfig
from swarm.model.local import LocalChain, generate
from swarm.model.units import ModelLayout
from swarm.source import SourceConfig, SwarmSource

pytestmark = pytest.mark.slow

HEARTBEAT_S = 0.3
PROMPTS = [[1, 17, 42, 99, 7], [1, 5]]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def tiny_peers(tiny_model_dir):
    procs = []
    try:
        for k in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "swarm", "join", "--interface", "127.0.0.1", "--name", f"g{k}",
                 "--model", str(tiny_model_dir), "--heartbeat", str(HEARTBEAT_S), "--probe-interval", "60"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"}))
        joined = []
        for proc in procs:
            ready, _, _ = select.select([proc.stdout], [], [], 120)
            assert ready, "swarm join did not start"
            joined.append((proc, json.loads(proc.stdout.readline())))
        yield joined
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def test_source_plans_deploys_generates_and_replans_when_a_peer_dies(tiny_model_dir, tiny_peers):
    chain = LocalChain.load(tiny_model_dir, [(0, 6)], max_slots=4, max_len=64)
    expected = generate(chain, PROMPTS, NEW_TOKENS)
    # This device may hold only the embedding: the blocks and head must go to a peer.
    embed_bytes = ModelLayout.read(tiny_model_dir).unit_weight_bytes("float32")[0]
    config = SourceConfig(interfaces=["127.0.0.1"], model=tiny_model_dir, mem_bytes=embed_bytes, min_peers=2,
                          max_len=64, liveness=LivenessConfig(interval_s=HEARTBEAT_S), probe=ProbeConfig(interval_s=60))
    addresses = {j["address"]: (proc, j["joined"]) for proc, j in tiny_peers}
    async with SwarmSource(config) as source:
        got = [[t async for t in source.generate(p, NEW_TOKENS)] for p in PROMPTS]
        assert got == expected
        first = source.current.stages
        assert (first[0].address, first[0].start, first[0].end) == (None, 0, 1)
        assert len(first) == 2 and first[1].address in addresses and (first[1].start, first[1].end) == (1, 6)
        assert not source.needs_replan()

        proc, pid = addresses[first[1].address]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert await source.directory.wait_for(lambda live: pid not in live, config.liveness.drop_bound_s + 1)
        assert source.needs_replan()
        got = await source.generate_all(PROMPTS, NEW_TOKENS)
        assert got == expected
        second = source.current.stages
        assert second[1].address in addresses and second[1].address != first[1].address
