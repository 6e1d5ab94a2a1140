"""PeerClient against real sockets: replies matched to requests, and closing fails what still waits."""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq
import zmq.asyncio

from swarm.runtime import sockets
from swarm.runtime.client import PeerClient, PeerError
from swarm.runtime.wire import Kind, decode

CLOSE_BOUND_S = 2.0


async def test_requests_get_their_own_replies(peers):
    async with PeerClient(peers[0]) as client:
        pings = [client.ping(timeout=10) for _ in range(5)]
        probe = client.probe(send_bytes=4096, reply_bytes=1024, timeout=10)
        *statuses, rtt = await asyncio.gather(*pings, probe)
    assert all("uptime_s" in s for s in statuses) and rtt > 0


async def test_closing_fails_a_request_to_a_frozen_peer_at_once():
    ctx = zmq.asyncio.Context()
    frozen, address = sockets.bind_router(ctx, "127.0.0.1", 0)  # a member that takes requests, never answers
    port = sockets.port_of(address)
    try:
        client = PeerClient(f"tcp://127.0.0.1:{port}").start()
        request = asyncio.create_task(client.request(Kind.INFO, timeout=600))
        frames = await frozen.recv_multipart()  # the request is on the wire, its reply will never come
        assert decode(frames[1:]).kind is Kind.INFO
        began = time.monotonic()
        async with asyncio.timeout(CLOSE_BOUND_S):
            await client.aclose()
            with pytest.raises(PeerError, match="closed"):
                await request
        assert time.monotonic() - began < CLOSE_BOUND_S
        with pytest.raises(PeerError, match="closed"):  # and later requests fail at once
            await client.ping(timeout=600)
        await client.aclose()  # idempotent
    finally:
        frozen.close()
        ctx.term()


async def test_a_peer_that_closes_its_connection_is_heard_at_once_and_a_frozen_one_is_not():
    ctx = zmq.asyncio.Context()
    server, address = sockets.bind_router(ctx, "127.0.0.1", 0)
    closed = asyncio.Event()
    client = PeerClient(f"tcp://127.0.0.1:{sockets.port_of(address)}", on_disconnect=closed.set).start()
    try:
        request = asyncio.create_task(client.request(Kind.INFO, timeout=600))
        await server.recv_multipart()  # connected; the peer holds the request and says nothing
        await asyncio.sleep(0.3)
        assert not closed.is_set()  # silence is not a closed connection
        began = time.monotonic()
        server.close()  # as the kernel does for a killed process
        async with asyncio.timeout(CLOSE_BOUND_S):
            await closed.wait()
        assert time.monotonic() - began < CLOSE_BOUND_S
        request.cancel()
    finally:
        await client.aclose()
        ctx.term()


def _terminates(ctx: zmq.Context, within_s: float = 5.0) -> bool:
    """Whether ctx.term() returns: it blocks for as long as any socket of ctx is open."""
    import threading

    done = threading.Thread(target=ctx.term, daemon=True)
    done.start()
    done.join(within_s)
    if done.is_alive():  # free the thread before failing: close whatever was left open
        ctx.destroy(linger=0)
        return False
    return True


async def test_a_client_closes_every_socket_it_opened_even_when_its_close_is_cancelled():
    """A Directory shares one context among its clients and terminates it on close. A client
    whose close was cancelled (by a task group's exit, mid-close) left its socket open, and
    ctx.term() blocked for good: a CI run hung in test_directory.py until its timeout."""
    ctx = sockets.new_context()
    client = PeerClient("tcp://127.0.0.1:9", ctx=ctx, on_disconnect=lambda: None).start()
    await asyncio.sleep(0.05)  # the reader and the connection watcher wait on their sockets
    closing = asyncio.create_task(client.aclose())
    await asyncio.sleep(0)  # aclose now waits for its tasks to end
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert _terminates(ctx)
