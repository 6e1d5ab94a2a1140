"""Three `swarm join` processes on 127.0.0.1 and a source in the test process."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers.discovery import fixture_profile, stop_processes
from swarm.discovery.liveness import LivenessConfig
from swarm.discovery.links import ProbeConfig
from swarm.discovery.txt import decode, from_profile
from swarm.runtime.client import PeerClient
from swarm.source import SourceConfig, SwarmSource

pytestmark = pytest.mark.slow
torch.set_num_threads(1)

HEARTBEAT_S = 0.3
# swarm join --heartbeat sets the interval; timeout and misses are the defaults
BOUND_S = LivenessConfig(interval_s=HEARTBEAT_S).drop_bound_s
START_TIMEOUT_S = 60


# This run's model: peers another suite on the machine announces over loopback mDNS are
# heard and ignored (another fingerprint), never counted among these.
FINGERPRINT = "sha256:" + secrets.token_hex(32)


def _profile(k: int) -> dict:
    return fixture_profile(block_decode_s=0.001 * (k + 2), mem_bytes=(k + 2) << 30, name=f"p{k}",
                           fingerprint=FINGERPRINT)


def _spawn(folder, k: int) -> tuple[subprocess.Popen, dict]:
    """`swarm join` as peer p<k> with its own profile; returns it with the profile."""
    profile = _profile(k)
    path = folder / f"p{k}.json"
    path.write_text(json.dumps(profile))
    proc = subprocess.Popen(
        [sys.executable, "-m", "swarm", "join", "--interface", "127.0.0.1", "--name", f"p{k}",
         "--profile", str(path), "--heartbeat", str(HEARTBEAT_S), "--probe-interval", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc, profile


def _joined(proc: subprocess.Popen) -> dict:
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_S)
    assert ready, "swarm join did not start"
    return json.loads(proc.stdout.readline())


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    """Three peers, each with its own profile; yields [(process, joined line, profile)]."""
    folder = tmp_path_factory.mktemp("peers")
    procs = []
    try:
        for k in range(3):
            procs.append(_spawn(folder, k))
        yield [(proc, _joined(proc), profile) for proc, profile in procs]
    finally:
        stop_processes([proc for proc, _ in procs])


async def _info(address: str) -> dict:
    async with PeerClient(address) as c:
        return await c.info()


async def _until(predicate, timeout: float, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(step)  # polling with a deadline, not a fixed wait
    return await predicate()


async def test_each_peer_sees_the_other_two_with_their_figures_and_links(peers):
    ids = {joined["joined"]: (joined, profile) for _, joined, profile in peers}

    async def views():
        infos = [await _info(joined["address"]) for _, joined, _ in peers]
        complete = all(
            {p["id"] for p in info["peers"]} == set(ids) - {decode(info["announcement"]).peer_id}
            # every view shows every other peer's links to the rest: announcement updates arrived
            and all(set(decode(p["txt"]).links) == set(ids) - {p["id"]} for p in info["peers"])
            for info in infos)
        return infos if complete else None

    infos = await _until(views, 30)
    assert infos, "peers did not converge on a full view with links"
    for info in infos:
        for entry in info["peers"]:
            seen = decode(entry["txt"])
            joined, profile = ids[seen.peer_id]
            expected = from_profile(profile, seen.peer_id, joined["name"], joined["mem_bytes"])
            assert (seen.mem_bytes, seen.prefill_us, seen.decode_us, seen.name, seen.fingerprint) == (
                expected.mem_bytes, expected.prefill_us, expected.decode_us, expected.name, expected.fingerprint)
            assert seen.seq > 0  # what is seen is a re-announcement, not the first record
            assert all(link.bandwidth > 1e6 and 0 < link.rtt < 0.1 for link in seen.links.values())
            assert entry["port"] == int(joined["address"].rsplit(":", 1)[1])


async def test_problem_built_from_announcements_equals_the_peers_profiles(peers):
    source_profile = fixture_profile(block_decode_s=0.0005, mem_bytes=1 << 30, name="src", fingerprint=FINGERPRINT)
    config = SourceConfig(interfaces=["127.0.0.1"], profile=source_profile, min_peers=3,
                          liveness=LivenessConfig(interval_s=HEARTBEAT_S), probe=ProbeConfig(interval_s=60))
    async with SwarmSource(config) as source:
        data = await source.problem()
        planned = await source.plan()
    by_id = {joined["joined"]: profile for _, joined, profile in peers}
    assert data["peer_ids"][0] == source.peer_id and set(data["peer_ids"][1:]) == set(by_id)
    for k, pid in enumerate(data["peer_ids"]):
        profile = source_profile if k == 0 else by_id[pid]
        device = data["devices"][k]
        assert device["mem"] == profile["device"]["mem_bytes"]
        assert len(device["time"]) == len(profile["units"])
        # decode times: a plan's R is the per-token latency (issue 26)
        assert max(abs(t - u["decode_s"]) for t, u in zip(device["time"], profile["units"])) <= 1e-6
        # each peer measured its hop overhead on its own data socket; the source on a worker of its own
        assert device["hop_overhead"] > 0
    m = len(data["devices"])
    assert all(data["bandwidth"][i][j] > 1e6 for i in range(m) for j in range(m) if i != j)
    assert planned.plan.stages[0].device == 0 and planned.stages[0].address is None
    # the source is the fastest device and holds the whole (small) model: no hop is worth it
    assert [(s.start, s.end) for s in planned.plan.stages] == [(0, len(source_profile["units"]))]


async def test_a_killed_peer_is_dropped_at_once_as_its_connections_close(peers, tmp_path):
    # The victim is a fourth peer of this test's own: the module's three stay for the others.
    victim, _ = _spawn(tmp_path, 3)
    try:
        vid = _joined(victim)["joined"]

        async def seen_by():
            infos = [await _info(j["address"]) for _, j, _ in peers]
            return [vid in {p["id"] for p in info["peers"]} for info in infos]

        async def everyone_sees_it():
            return all(await seen_by())

        assert await _until(everyone_sees_it, 30)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed = time.monotonic()

        async def nobody_sees_it():
            return not any(await seen_by())

        assert await _until(nobody_sees_it, BOUND_S + 2, step=0.05)
        # Its kernel closed its connections: no heartbeat had to be missed (only a frozen
        # peer, whose connections stay open, takes the heartbeat bound).
        assert time.monotonic() - killed <= min(1.0, BOUND_S / 2)
    finally:
        stop_processes([victim])
