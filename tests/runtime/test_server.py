"""The shard server: control kinds, errors that name the problem, a loop that stays responsive."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
import zmq

from swarm.runtime import sockets
from swarm.runtime.client import PeerClient, PeerError
from swarm.runtime.server import ServerConfig, ShardServer
from swarm.runtime.sockets import data_address
from swarm.runtime.wire import Kind, Message, decode, encode

LAG_PROBE_S = 0.002  # the loop-lag monitor's sleep
LOOP_BLOCKED_S = 20.0  # how long the loop is held while steps must still flow


@pytest.fixture
async def server():
    async with ShardServer(ServerConfig(port=0, threads=1, info={"device": {"name": "test", "threads": 1}})) as srv:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(srv.serve_forever())
            yield srv
            srv.close()


async def test_ping_info_probe(server):
    async with PeerClient(server.address) as peer:
        status = await peer.ping()
        assert status["state"] == "idle" and status["steps"] == 0
        assert await peer.info() == {"device": {"name": "test", "threads": 1}}
        reply = await peer.request(Kind.PROBE, {"reply_bytes": 5000}, (torch.ones(70000, dtype=torch.uint8),))
        assert reply.tensors[0].shape == (5000,)
        assert await peer.probe() > 0


async def test_errors_name_the_problem_and_the_server_carries_on(server, tiny_model_dir):
    async with PeerClient(server.address) as peer:
        with pytest.raises(PeerError, match="no shard loaded"):
            await peer.open_slots([0])
        with pytest.raises(PeerError, match="not found on this peer"):
            await peer.load("/nonexistent/model", 0, 6, slots=1, max_len=8)
        with pytest.raises(PeerError, match="empty unit range"):
            await peer.load(tiny_model_dir, 3, 3, slots=1, max_len=8)
        with pytest.raises(PeerError, match="does not accept 'pong'"):
            await peer.request(Kind.PONG, {"status": {}})
        ready = await peer.load(tiny_model_dir, 2, 6, slots=2, max_len=16, dep=7)
        assert ready.weight_bytes > 0 and ready.kv_bytes > 0
        with pytest.raises(PeerError, match="slot 5 out of range"):
            await peer.open_slots([5])
        status = await peer.ping()
        assert status["state"] == "loaded" and (status["start"], status["end"]) == (2, 6) and status["errors"] >= 5
        await peer.unload()
        assert (await peer.ping())["state"] == "idle"


async def test_steps_travel_on_the_data_socket_and_jobs_on_the_control_socket(server, tiny_model_dir):
    data = data_address(server.address, server.data_port)
    step = Message(Kind.STEP, {"dep": 3, "mb": 0, "step": 1, "slots": [0], "src": b"nobody"},
                   (torch.zeros(1, 1, 7),))
    async with PeerClient(server.address) as peer, PeerClient(data) as source:
        with pytest.raises(PeerError, match=f"send steps to the data socket \\(port {server.data_port}\\)"):
            await peer.request(Kind.STEP, step.fields, step.tensors)
        with pytest.raises(PeerError, match="the data socket takes 'step' and 'ping', not 'load'"):
            await source.load(tiny_model_dir, 2, 6, slots=1, max_len=8)
        assert (await source.ping()) == {"queued": 0}
        await peer.load(tiny_model_dir, 2, 6, slots=1, max_len=8, dep=3)
        await peer.open_slots([0])
        # A step whose hidden size does not fit: the error goes home to the step's source identity.
        wrong = Message(Kind.STEP, {**step.fields, "src": source.identity}, step.tensors, id=5)
        with pytest.raises(PeerError, match="step failed: hidden size 7, the shard expects"):
            await source.request(Kind.STEP, wrong.fields, wrong.tensors)
        assert (await peer.ping())["errors"] == 3


async def test_steps_flow_while_the_event_loop_is_blocked(server, tiny_model_dir, tiny_reference):
    """The torch thread receives, computes and answers steps by itself: the loop is off the data path."""
    prompt, new = [5, 9, 2, 7], 6
    async with PeerClient(server.address) as peer:
        await peer.load(tiny_model_dir, 0, 6, slots=1, max_len=32, dep=4)  # the whole model: tokens come back
        await peer.open_slots([0])
    data = data_address(server.address, server.data_port)
    got: list[int] = []
    finished = threading.Event()

    def source() -> None:  # a blocking DEALER on its own thread, as a source's torch thread would be
        ctx = zmq.Context()
        sock = sockets.connect_dealer(ctx, data, b"src-blocking")
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        try:
            sock.send_multipart(encode(Message(Kind.PING, id=1)))
            assert decode(sock.recv_multipart()).kind is Kind.PONG
            x = torch.tensor([prompt])
            for step in range(new):
                sock.send_multipart(encode(Message(Kind.STEP, {"dep": 4, "mb": 0, "step": step, "slots": [0],
                                                               "src": b"src-blocking"}, (x,))))
                reply = decode(sock.recv_multipart())
                got.append(int(reply.tensors[0][0]))
                x = reply.tensors[0].clone().view(1, 1)
            finished.set()
        finally:
            sock.close(linger=0)
            ctx.term()

    thread = threading.Thread(target=source)
    thread.start()
    finished.wait(LOOP_BLOCKED_S)  # blocks this event loop, which is also the server's
    blocked_throughout = finished.is_set()
    await asyncio.to_thread(thread.join)
    assert blocked_throughout and got == tiny_reference([prompt], new)[0]


async def test_event_loop_is_not_blocked_while_a_shard_computes(server, tiny_model_dir):
    """Big prefill steps run on the torch thread; the loop's lag stays far below a step's time."""
    slots, width, steps = 16, 480, 4
    tokens: asyncio.Queue[Message] = asyncio.Queue()
    data = data_address(server.address, server.data_port)
    async with PeerClient(server.address) as peer, PeerClient(data, on_message=tokens.put_nowait) as source:
        await peer.load(tiny_model_dir, 0, 6, slots=slots, max_len=width * steps, dep=1)
        await peer.open_slots(list(range(slots)))
        await source.ping()  # the data socket knows the way home before the first token
        x = torch.randint(0, 256, (slots, width))
        for step in range(steps):
            await source.send(Message(Kind.STEP, {"dep": 1, "mb": 0, "step": step, "slots": list(range(slots)),
                                                  "src": source.identity}, (x,)))
        lags, pings, done = [], [], 0
        while done < steps:
            began = time.perf_counter()
            await asyncio.sleep(LAG_PROBE_S)
            lags.append(time.perf_counter() - began - LAG_PROBE_S)
            if len(lags) % 10 == 0:
                began = time.perf_counter()
                await peer.ping()
                pings.append(time.perf_counter() - began)
            while not tokens.empty():
                assert tokens.get_nowait().kind is Kind.TOKENS
                done += 1
        status = await peer.ping()
    step_s = status["busy_s"] / status["steps"]
    # The test only means something if a step is long; then the loop must never stall for it.
    assert status["steps"] == steps and step_s > 0.05
    assert max(lags) < step_s / 3, (max(lags), step_s)
    assert max(pings) < step_s / 2, (max(pings), step_s)


async def test_close_is_idempotent_and_wakes_serve_forever():
    async with ShardServer(ServerConfig()) as srv:
        async with asyncio.TaskGroup() as tg:
            serving = tg.create_task(srv.serve_forever())
            await asyncio.sleep(0.05)
            assert not serving.done()
            srv.close()
            srv.close()
            async with asyncio.timeout(5):  # close() wakes it: it returns, it is not cancelled
                await asyncio.shield(serving)
        assert serving.result() is None
        address = srv.address
    await srv.aclose()  # again, after __aexit__
    assert srv._sock is None and srv._worker is None
    async with PeerClient(address) as peer:  # nothing answers there any more
        with pytest.raises((PeerError, TimeoutError)):
            await peer.ping(timeout=0.3)


def test_info_must_be_sendable():
    with pytest.raises(ValueError, match="plain JSON-like"):
        ServerConfig(info={"when": object()})


async def test_published_info_is_what_info_answers(server):
    config_info = dict(server.config.info)
    async with PeerClient(server.address) as peer:
        server.publish_info({"announcement": "v2", "peers": [{"id": "x"}]})
        assert await peer.info() == {"announcement": "v2", "peers": [{"id": "x"}]}
        with pytest.raises(ValueError):
            server.publish_info({"when": object()})
        assert await peer.info() == {"announcement": "v2", "peers": [{"id": "x"}]}  # the last good one stays
    assert server.config.info == config_info  # the frozen config is never mutated


async def test_an_oversized_frame_is_never_accepted(tiny_model_dir):
    from swarm.runtime.wire import WireLimits

    async with ShardServer(ServerConfig(limits=WireLimits(max_tensor_bytes=1 << 16))) as srv:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(srv.serve_forever())
            async with PeerClient(srv.address) as big, PeerClient(srv.address) as small:
                with pytest.raises(PeerError, match="no reply"):
                    await big.request(Kind.PROBE, {}, (torch.zeros(1 << 20, dtype=torch.uint8),), timeout=0.5)
                assert (await small.ping())["errors"] == 0  # the server carried on
            srv.close()


async def test_a_peer_loads_its_own_copy_of_the_model_named_by_fingerprint(tiny_model_dir):
    """The source's folder path means nothing on another machine: the fingerprint picks the peer's copy."""
    from swarm.model.store import model_fingerprint

    fingerprint = model_fingerprint(tiny_model_dir)
    config = ServerConfig(port=0, threads=1, models={fingerprint: str(tiny_model_dir)})
    async with ShardServer(config) as srv, asyncio.TaskGroup() as tg:
        tg.create_task(srv.serve_forever())
        async with PeerClient(srv.address) as peer:
            ready = await peer.load("/path/on/the/source", 2, 6, slots=1, max_len=8, fingerprint=fingerprint)
            assert ready.weight_bytes > 0
            with pytest.raises(PeerError, match="not 'other-weights'"):
                await peer.load(tiny_model_dir, 2, 6, slots=1, max_len=8, fingerprint="other-weights")
        srv.close()


async def test_the_models_it_holds_are_warmed_up_first_and_ping_says_so(tiny_model_dir, monkeypatch):
    """A LOAD must cost its read only: the imports a first load pays are done as the first job,
    and PING's "warm" tells a caller (the recovery benchmark's spare peer) when they are."""
    from swarm.model import shard

    warmed = []
    monkeypatch.setattr(shard, "warm_up", lambda folder: time.sleep(0.3) or warmed.append(folder))
    async with ShardServer(ServerConfig(port=0, threads=1, models={"fp": str(tiny_model_dir)})) as srv:
        assert srv.status()["warm"] is False
        async with asyncio.TaskGroup() as tg:
            tg.create_task(srv.serve_forever())
            async with asyncio.timeout(10):
                while not srv.status()["warm"]:
                    await asyncio.sleep(0.02)
            assert warmed == [tiny_model_dir]
            srv.close()


async def test_a_leaving_peer_says_so_refuses_loads_and_waits_until_unloaded(server, tiny_model_dir):
    async with PeerClient(server.address) as peer:
        assert await server.leave(0) is True  # nothing loaded: free to go at once
        server.leaving = False
        await peer.load(tiny_model_dir, 2, 6, slots=1, max_len=8, dep=1)
        assert (await peer.ping())["leaving"] is False
        assert await server.leave(0.2) is False  # loaded, and nobody moved the stage away
        assert (await peer.ping())["leaving"] is True
        with pytest.raises(PeerError, match="this peer is leaving the swarm"):
            await peer.load(tiny_model_dir, 2, 6, slots=1, max_len=8, dep=2)
        async with asyncio.TaskGroup() as tg:
            left = tg.create_task(server.leave(30))
            await asyncio.sleep(0.1)
            assert not left.done()  # still serving: the answer in flight can finish
            await peer.unload()  # what the source does once it moved the stage
        assert left.result() is True


async def test_an_old_deployments_unload_leaves_a_newer_shard_alone(server, tiny_model_dir):
    # A re-plan loads the new deployment while the old one closes: the old UNLOAD may come last.
    async with PeerClient(server.address) as old, PeerClient(server.address) as new:
        await old.load(tiny_model_dir, 2, 6, slots=1, max_len=8, dep=1)
        await new.load(tiny_model_dir, 1, 4, slots=1, max_len=8, dep=2)
        await old.unload(dep=1)
        assert (await new.ping())["dep"] == 2
        await new.open_slots([0])  # still the new deployment's, and serving
        await new.unload(dep=2)
        assert (await new.ping())["dep"] is None


async def test_a_load_is_one_round_trip_to_the_torch_thread(server, tiny_model_dir):
    async with PeerClient(server.address) as peer:
        before = (await peer.ping())["jobs"]
        await peer.load(tiny_model_dir, 0, 6, slots=2, max_len=16, dep=2)
        loaded = await peer.ping()
        assert loaded["jobs"] == before + 1 and (loaded["dep"], loaded["start"], loaded["end"]) == (2, 0, 6)
        await peer.open_slots([0, 1])
        await peer.unload(dep=2)
        assert (await peer.ping())["jobs"] == before + 3


async def test_a_load_of_the_units_already_hosted_keeps_them(server, tiny_model_dir):
    async with PeerClient(server.address) as peer:
        first = await peer.load(tiny_model_dir, 2, 6, slots=2, max_len=16, dep=1)
        again = await peer.load(tiny_model_dir, 2, 6, slots=2, max_len=16, dep=2)
        assert not first.kept and again.kept and again.load_s == 0.0 and again.weight_bytes == first.weight_bytes
        assert (await peer.ping())["dep"] == 2
        other = await peer.load(tiny_model_dir, 2, 6, slots=2, max_len=32, dep=3)  # another cache shape: loaded
        assert not other.kept and other.load_s > 0
