"""Per-client limits on a peer: a member that misbehaves gets errors, the others keep their slots."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import torch
import zmq

from swarm.runtime import sockets
from swarm.runtime.client import PeerClient, PeerError
from swarm.runtime.server import ServerConfig, ShardServer
from swarm.runtime.sockets import data_address
from swarm.runtime.wire import Kind, Message, WireLimits, decode, encode


@contextlib.asynccontextmanager
async def serving(**limits):
    async with ShardServer(ServerConfig(limits=WireLimits(**limits))) as srv:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(srv.serve_forever())
            yield srv
            srv.close()


async def test_only_the_deployments_source_opens_and_closes_its_slots(tiny_model_dir):
    async with serving() as srv, PeerClient(srv.address) as owner, PeerClient(srv.address) as other:
        await owner.load(tiny_model_dir, 0, 6, slots=4, max_len=16)
        await owner.open_slots([0, 1])
        for request in (other.open_slots([1]), other.open_slots([2]), other.close_slots([0])):
            with pytest.raises(PeerError, match=r"belongs to another client's deployment"):
                await request
        await owner.open_slots([0])  # the owner restarts its own sequence
        await owner.close_slots([0, 1])
        await other.load(tiny_model_dir, 0, 6, slots=4, max_len=16)  # a new plan takes the peer over
        await other.open_slots([0])
        with pytest.raises(PeerError, match=r"belongs to another client's deployment"):
            await owner.open_slots([0])


async def test_sessions_per_client_are_bounded(tiny_model_dir):
    async with serving(max_sessions_per_client=2) as srv, PeerClient(srv.address) as a:
        await a.load(tiny_model_dir, 0, 6, slots=4, max_len=16)
        await a.open_slots([0, 1])
        with pytest.raises(PeerError, match=r"would hold 3 open slots \(limit 2\)"):
            await a.open_slots([2])
        await a.close_slots([1])
        await a.open_slots([2])


async def test_requests_in_flight_per_client_are_bounded_and_expire(tiny_model_dir):
    async with serving(max_requests_per_client=3, request_timeout_s=0.001) as srv, \
            PeerClient(srv.address) as flood, PeerClient(srv.address) as calm:
        load = asyncio.create_task(flood.load(tiny_model_dir, 0, 6, slots=2, max_len=16))
        opens = [asyncio.create_task(flood.open_slots([0])) for _ in range(5)]
        results = await asyncio.gather(load, *opens, return_exceptions=True)
        errors = [str(r) for r in results[1:]]
        # Behind the LOAD, two OPENs fit the bound of three in flight and expire in the queue; the rest are refused.
        assert sum("too many requests in flight" in e for e in errors) == 3, errors
        assert sum("not done within 0.001 s" in e for e in errors) == 2, errors
        assert not isinstance(results[0], Exception)
        assert "uptime_s" in await calm.ping()


async def test_bytes_queued_per_client_on_the_data_socket_are_bounded(tiny_model_dir):
    limit = 64 * 1024
    async with serving(max_queued_bytes_per_client=limit) as srv, PeerClient(srv.address) as peer:
        await peer.load(tiny_model_dir, 0, 6, slots=1, max_len=16, dep=1)
        worker = srv._worker
        ctx = zmq.Context()
        sock = sockets.connect_dealer(ctx, data_address(srv.address, srv.data_port), b"flooder")
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        try:
            sock.send_multipart(encode(Message(Kind.PING, id=1)))
            assert decode(sock.recv_multipart()).kind is Kind.PONG
            before = (await peer.ping())["received"]
            # Hold the torch thread so everything sent now is queued at once when it wakes.
            hold = asyncio.create_task(worker.call(time.sleep, 1.0))
            await asyncio.sleep(0.1)
            payload = torch.zeros(16 * 1024, dtype=torch.uint8)  # 16 KiB: four fit under the bound
            for i in range(10):
                sock.send_multipart(encode(Message(Kind.PROBE, {"reply_bytes": 0}, (payload,), id=10 + i)))
            await hold
            replies = [decode(sock.recv_multipart()) for _ in range(10)]
            refused = [r for r in replies if "bytes queued from this client" in r.get("error", "")]
            assert len(refused) == 10 - 3  # header frames count too: three whole messages fit
            assert (await peer.ping())["received"] - before == 10 + 1  # and this PING
        finally:
            sock.close()
            ctx.term()
