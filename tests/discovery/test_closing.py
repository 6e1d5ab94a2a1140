"""Closing while something waits: a directory, a peer and a source end every task they own, in bounded time.

A frozen peer here is a real ROUTER socket on 127.0.0.1 that takes requests and
never answers, as a process stopped with SIGSTOP does once the kernel has accepted
the connection. Each test fails (never hangs) when a close outlives CLOSE_BOUND_S.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import zmq
import zmq.asyncio

from swarm.discovery.directory import Directory, DirectoryConfig
from swarm.runtime import sockets
from swarm.discovery.links import ProbeConfig
from swarm.discovery.liveness import LivenessConfig
from swarm.discovery.peer import PeerConfig, SwarmPeer
from swarm.discovery.prober import LinkProber
from swarm.source import SourceConfig, SwarmSource
from swarm.runtime.wire import Kind, decode
from tests.helpers.discovery import fixture_profile

FAST = LivenessConfig(interval_s=0.2, timeout_s=0.5, misses=3)
CLOSE_BOUND_S = 5.0
LAGS = range(4)  # loop iterations between a wake-up and the cancel that races it


async def stop_within_bound(task: asyncio.Task) -> None:
    """Cancel a task and fail, not hang, if it is still running CLOSE_BOUND_S later."""
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=CLOSE_BOUND_S)
    assert done, f"{task.get_coro().__qualname__} still runs {CLOSE_BOUND_S} s after it was cancelled"
    assert task.cancelled(), f"{task.get_coro().__qualname__} swallowed its cancellation and returned"


@contextlib.asynccontextmanager
async def frozen_peer():
    """(address, requests heard): a socket that accepts requests and never answers."""
    ctx = zmq.asyncio.Context()
    sock, address = sockets.bind_router(ctx, "127.0.0.1", 0)  # a member of the swarm that never answers
    port = sockets.port_of(address)
    heard: list[Kind] = []

    async def listen():
        while True:
            frames = await sock.recv_multipart(copy=False)
            heard.append(decode(frames[1:]).kind)

    listener = asyncio.create_task(listen())
    try:
        yield f"127.0.0.1:{port}", heard
    finally:
        listener.cancel()
        await asyncio.wait([listener])
        sock.close()
        ctx.term()


async def until(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)  # polled under the timeout above


@pytest.mark.parametrize("lag", LAGS)
async def test_a_directory_stops_when_cancelled_as_its_heartbeat_wakes(lag):
    # The hang of issue 10: the heartbeat loop woke on `mdns.changed` (the seed loop sets it
    # every refresh) in the iteration its cancel came, and Python 3.11's wait_for returned
    # instead of raising, so the loop outlived its TaskGroup's one and only cancel.
    async with Directory(DirectoryConfig(interfaces=["127.0.0.1"], mdns=False, liveness=FAST)) as directory:
        task = asyncio.create_task(directory.run())
        await asyncio.sleep(0.05)  # the heartbeat loop now waits for news or its interval
        directory.mdns.changed.set()
        for _ in range(lag):
            await asyncio.sleep(0)
        await stop_within_bound(task)


@pytest.mark.parametrize("lag", LAGS)
async def test_a_prober_stops_when_cancelled_as_the_live_set_changes(lag):
    async with Directory(DirectoryConfig(interfaces=["127.0.0.1"], mdns=False, liveness=FAST)) as directory:
        task = asyncio.create_task(LinkProber(directory, 0, ProbeConfig(interval_s=60)).run())
        await asyncio.sleep(0.05)  # waiting for the live set to change
        directory._bump()
        for _ in range(lag):
            await asyncio.sleep(0)
        await stop_within_bound(task)


async def test_closing_a_directory_wakes_whoever_waits_for_peers():
    directory = Directory(DirectoryConfig(interfaces=["127.0.0.1"], mdns=False, liveness=FAST))
    async with directory:
        waiter = asyncio.create_task(directory.wait_for(lambda live: len(live) >= 1, timeout=600))
        await asyncio.sleep(0.05)
    async with asyncio.timeout(CLOSE_BOUND_S):
        assert await waiter is False


async def test_a_peer_closes_while_its_requests_to_a_frozen_peer_wait():
    async with frozen_peer() as (address, heard):
        config = PeerConfig(name="p", interfaces=["127.0.0.1"], seeds=(address,), mdns=False, liveness=FAST,
                            probe=ProbeConfig(interval_s=60))
        peer = SwarmPeer(config, fixture_profile())
        async with asyncio.timeout(CLOSE_BOUND_S):
            await peer.__aenter__()
        try:
            task = asyncio.create_task(peer.run())
            await until(lambda: Kind.INFO in heard)  # the seed loop now waits for an answer
            await stop_within_bound(task)
        finally:
            async with asyncio.timeout(CLOSE_BOUND_S):
                await peer.aclose()


async def test_a_source_closes_while_it_waits_for_a_frozen_peer_and_a_caller_waits_for_peers():
    async with frozen_peer() as (address, heard):
        config = SourceConfig(interfaces=["127.0.0.1"], seeds=(address,), mdns=False, profile=fixture_profile(),
                              min_peers=1, links_timeout_s=600, liveness=FAST)
        source = SwarmSource(config)
        async with asyncio.timeout(CLOSE_BOUND_S):
            await source.__aenter__()
        try:
            planning = asyncio.create_task(source.problem())  # waits for a peer that never comes
            await until(lambda: Kind.INFO in heard)
        finally:
            async with asyncio.timeout(CLOSE_BOUND_S):
                await source.aclose()
        async with asyncio.timeout(CLOSE_BOUND_S):
            with pytest.raises(RuntimeError, match="closed"):
                await planning
