"""`swarm join` peers serving the tiny model; the source plans over their announcements,
deploys, answers with the single-process tokens, and re-plans when its peer dies."""

from __future__ import annotations

import asyncio
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
from tests.helpers.discovery import stop_processes

pytestmark = pytest.mark.slow

HEARTBEAT_S = 0.3
PROMPTS = [[1, 17, 42, 99, 7], [1, 5]]
NEW_TOKENS = 10


def _join(model_dir, name: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "swarm", "join", "--interface", "127.0.0.1", "--name", name,
         "--model", str(model_dir), "--heartbeat", str(HEARTBEAT_S), "--probe-interval", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _joined(proc: subprocess.Popen) -> dict:
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    assert ready, "swarm join did not start"
    return json.loads(proc.stdout.readline())


@pytest.fixture(scope="module")
def tiny_peers(tiny_model_dir):
    """Two peers, stopped after the module's tests (a test stops what it starts itself)."""
    procs = []
    try:
        procs += [_join(tiny_model_dir, f"g{k}") for k in range(2)]
        yield [(proc, _joined(proc)) for proc in procs]
    finally:
        stop_processes(procs)


async def test_source_plans_deploys_generates_and_replans_when_peers_leave_or_join(tiny_model_dir, tiny_peers):
    joined = tiny_peers
    chain = LocalChain.load(tiny_model_dir, [(0, 6)], max_slots=4, max_len=64)
    expected = generate(chain, PROMPTS, NEW_TOKENS)
    # This device may hold only the embedding: the blocks and head must go to a peer.
    embed_bytes = ModelLayout.read(tiny_model_dir).unit_weight_bytes("float32")[0]
    config = SourceConfig(interfaces=["127.0.0.1"], model=tiny_model_dir, mem_bytes=embed_bytes, min_peers=2,
                          max_len=64, liveness=LivenessConfig(interval_s=HEARTBEAT_S), probe=ProbeConfig(interval_s=60))
    addresses = {j["address"]: (proc, j["joined"]) for proc, j in joined}
    async with SwarmSource(config) as source:
        got = [[t async for t in source.generate(p, NEW_TOKENS)] for p in PROMPTS]
        assert got == expected
        first = source.current.stages
        assert (first[0].address, first[0].start, first[0].end) == (None, 0, 1)
        # the rest on the peers: one, or both where their own measured profiles make a split pay
        assert all(s.address in addresses for s in first[1:]) and (first[1].start, first[-1].end) == (1, 6)
        assert not source.needs_replan()

        proc, pid = addresses[first[1].address]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Between requests too, the source re-plans as soon as the directory drops the stage's peer.
        async with asyncio.timeout(config.liveness.drop_bound_s + 10):
            while not source.state().recoveries:
                await asyncio.sleep(0.05)
        event = source.state().recoveries[-1]
        names = {j["address"]: j["name"] for _, j in joined}
        assert event.error is None and event.lost == (names[first[1].address],) and event.sequences == 0
        assert pid not in source.state().peer_ids and not source.needs_replan()
        got = await source.generate_all(PROMPTS, NEW_TOKENS)
        assert got == expected
        second = source.current.stages
        assert second[1].address in addresses and second[1].address != first[1].address

        # A peer joins: the next request is planned over it too.
        late = _join(tiny_model_dir, "g2")
        try:
            newcomer = _joined(late)["joined"]
            assert await source.directory.wait_for(lambda live: newcomer in live, 30)
            assert source.needs_replan()
            assert await source.generate_all(PROMPTS, NEW_TOKENS) == expected
            assert newcomer in source.current.peer_ids and not source.needs_replan()
        finally:
            stop_processes([late])
