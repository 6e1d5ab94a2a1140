"""In-process peers on 127.0.0.1: unicast seeds without multicast, and the diagnostic."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time

from swarm.aio import bounded, cancel_and_wait
from swarm.discovery.directory import Directory, DirectoryConfig
from swarm.discovery.links import ProbeConfig
from swarm.discovery.liveness import LivenessConfig
from swarm.discovery.peer import PeerConfig, SwarmPeer
from swarm.discovery.prober import LinkProber
from swarm.discovery.txt import short_fingerprint
from tests.helpers.discovery import fixture_profile

FAST = LivenessConfig(interval_s=0.2, timeout_s=0.5, misses=3)
PATIENT = LivenessConfig(interval_s=0.2, timeout_s=5.0, misses=3)
TIMEOUT_S = 20
CLOSE_BOUND_S = 5


# This run's model: peers that another suite on the machine announces over loopback mDNS
# serve another fingerprint, so they are heard and ignored, never counted.
OURS = "sha256:" + secrets.token_hex(32)


def _peer(name: str, seeds=(), mdns=True, fingerprint=OURS) -> SwarmPeer:
    config = PeerConfig(name=name, interfaces=["127.0.0.1"], seeds=tuple(seeds), mdns=mdns, liveness=FAST,
                        probe=ProbeConfig(interval_s=60))
    return SwarmPeer(config, fixture_profile(fingerprint=fingerprint))


@contextlib.asynccontextmanager
async def _running(*things):
    """Run each (already entered) peer or directory; on exit cancel them, failing (not
    hanging) if one outlives CLOSE_BOUND_S."""
    tasks = [asyncio.create_task(t.run()) for t in things]
    try:
        yield
    finally:
        async with asyncio.timeout(CLOSE_BOUND_S):
            await cancel_and_wait(*tasks)
    for task in tasks:  # a run() that failed on its own fails the test
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()


async def test_seeds_find_peers_without_multicast_one_hop_of_gossip():
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(_peer("a", mdns=False))
        b = await stack.enter_async_context(_peer("b", seeds=[f"127.0.0.1:{a.port}"], mdns=False))
        watcher = await stack.enter_async_context(Directory(DirectoryConfig(
            interfaces=["127.0.0.1"], seeds=(f"127.0.0.1:{b.port}",), mdns=False, liveness=FAST,
            seed_refresh_s=0.2)))
        async with _running(a, b, watcher):
            # the watcher only knows b; b's INFO lists a, whom b found through its own seed
            assert await watcher.wait_for(lambda live: {a.peer_id, b.peer_id} <= set(live), TIMEOUT_S)
            assert watcher.live[a.peer_id].port == a.port
            assert watcher.live[a.peer_id].announcement.mem_bytes == a.announcement().mem_bytes
            # issue 26: each peer measured its own hop overhead on its data socket and announced it
            assert watcher.live[a.peer_id].announcement.hop_overhead_us == round(a.hop_overhead_s * 1e6) > 0
            assert not watcher.mdns.heard.names  # nothing came over multicast


async def test_diagnostic_says_what_was_tried_heard_and_ignored():
    other_model = _peer("other-model", fingerprint="sha256:" + "cd" * 32)
    watcher = Directory(DirectoryConfig(interfaces=["127.0.0.1"], seeds=("127.0.0.1:9",),
                                        fingerprint=short_fingerprint(OURS), liveness=FAST, seed_refresh_s=0.2))
    async with other_model, watcher, _running(other_model, watcher):
        async def heard():
            while not (any("other-model" in n for n in watcher.mdns.heard.names) and watcher.seed_errors
                       and watcher.mdns.heard.rejected):
                await asyncio.sleep(0.05)  # polled under the timeout below
        await bounded(heard(), TIMEOUT_S)
        watcher.candidates()
        text = watcher.diagnostic()
    assert not watcher.live
    assert "mDNS on 127.0.0.1" in text
    assert f"other-model-{other_model.peer_id}._swarm._tcp.local." in text
    assert "model cdcdcdcdcdcdcdcd, not ours" in text
    assert "seed 127.0.0.1:9:" in text


async def test_refreshes_wait_while_generating_but_a_new_peer_is_measured_at_once():
    probe = ProbeConfig(interval_s=0.2, max_defer=3, min_bytes=4096, rounds=2, ping_rounds=2)
    # The target only, through a seed: measurements count its link and no other peer's.
    # Dropping it would rightly measure it again at once, so a loaded machine (heartbeats
    # late by over FAST's half second) must not drop it here.
    target = _peer("target", mdns=False)
    async with target:
        watcher = Directory(DirectoryConfig(interfaces=["127.0.0.1"], seeds=(f"127.0.0.1:{target.port}",),
                                            mdns=False, liveness=PATIENT))
        prober = LinkProber(watcher, 0, probe, busy=lambda: True)  # a generation runs all along
        async with watcher, _running(target, watcher, prober):
            async def measured(n):
                while prober.measurements < n:
                    await asyncio.sleep(0.02)  # polled under the timeout below
            await bounded(measured(1), TIMEOUT_S)  # busy, but never measured: at once
            first = time.monotonic()
            await bounded(measured(2), TIMEOUT_S)  # deferred, but at most max_defer times
            waited = time.monotonic() - first
        assert waited >= (probe.max_defer + 1) * probe.interval_s * (1 - probe.jitter)
        assert target.peer_id in prober.links


async def test_a_peer_that_leaves_is_dropped_at_once_and_never_readded():
    """Graceful leave: the goodbye and the "leaving" PONG drop it within a heartbeat, far
    inside the bound that missed heartbeats take, and it stays out while it still serves."""
    slow_to_miss = LivenessConfig(interval_s=0.2, timeout_s=5.0, misses=50)  # misses would take > 10 s
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(_peer("a", mdns=False))
        watcher = await stack.enter_async_context(Directory(DirectoryConfig(
            interfaces=["127.0.0.1"], seeds=(f"127.0.0.1:{a.port}",), mdns=False, liveness=slow_to_miss,
            seed_refresh_s=0.2)))
        async with _running(a, watcher):
            assert await watcher.wait_for(lambda live: a.peer_id in live, TIMEOUT_S)
            began = time.monotonic()
            assert await a.leave(0) is True  # it holds no stage
            assert await watcher.wait_for(lambda live: a.peer_id not in live, TIMEOUT_S)
            assert time.monotonic() - began < 2.0
            await asyncio.sleep(1.0)  # seeds keep answering INFO and PING: still out
            assert a.peer_id not in watcher.live
            assert (await watcher.client("127.0.0.1", a.port).ping())["leaving"] is True
