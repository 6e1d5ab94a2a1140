"""Malformed and random frames thrown at running peers while a generation goes through them."""

from __future__ import annotations

import asyncio
import threading

import msgpack
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm.aio import bounded
from swarm.runtime import sockets
from swarm.runtime.client import PeerClient
from swarm.runtime.engine import Pipeline, PipelineConfig
from swarm.runtime.schedule import Layout
from swarm.runtime.sockets import data_address
from swarm.runtime.wire import PROTOCOL_VERSION

from tests.helpers.pipeline import PROMPTS, plan_for

REPLY_TIMEOUT_MS = 5000
FUZZ_IDENTITY = b"fuzzer-1"

junk = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(), st.text(max_size=8),
                 st.binary(max_size=8), st.lists(st.integers(-3, 2**33), max_size=4))


def bad_step(dep: int):
    """Step-shaped messages that must each be refused: bad fields, bad tensors, or another deployment."""
    fields = st.fixed_dictionaries({
        "dep": st.one_of(st.integers(0, 2**31).filter(lambda d: d != dep), junk),
        "mb": st.one_of(st.integers(0, 3), junk), "step": st.one_of(st.integers(0, 9), junk),
        "slots": st.one_of(st.lists(st.integers(0, 9), min_size=1, max_size=3), junk),
        "src": st.just(FUZZ_IDENTITY),
        "t": st.one_of(st.just([["float32", [1, 1, 64]]]), st.lists(st.lists(junk, max_size=3), max_size=2), junk),
    })
    tails = st.lists(st.binary(max_size=300), max_size=2)
    return st.tuples(fields, tails).map(
        lambda ft: [msgpack.packb({"v": PROTOCOL_VERSION, "k": "step", **ft[0]}, use_bin_type=True), *ft[1]])


def random_frames():
    return st.lists(st.binary(max_size=100), min_size=1, max_size=3)


def fuzz_peer(address: str, dep: int, stop: threading.Event) -> int:
    """Send hypothesis-made messages with a blocking DEALER; each must get an error back."""
    ctx = zmq.Context()
    sock = sockets.connect_dealer(ctx, address, FUZZ_IDENTITY)  # a member (CURVE keys of the run's swarm)
    sock.setsockopt(zmq.RCVTIMEO, REPLY_TIMEOUT_MS)
    sent = [0]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.one_of(random_frames(), bad_step(dep)))
    def one(frames):
        sock.send_multipart(frames)
        reply = msgpack.unpackb(sock.recv_multipart()[0])
        assert reply["k"] == "error" and reply["error"], reply
        sent[0] += 1

    try:
        one()
    finally:
        stop.set()
        sock.close()
        ctx.term()
    return sent[0]


async def test_running_peers_refuse_garbage_and_keep_generating(tiny_model_dir, peers, tiny_reference):
    plan = plan_for(peers, 2)
    want = tiny_reference(PROMPTS, 12)
    async with Pipeline(PipelineConfig(tiny_model_dir, plan, layout=Layout(2, 2))) as pipe:
        rounds = 0
        async with PeerClient(peers[0]) as peer:
            data = data_address(peers[0], (await peer.ping())["data_port"])
        # Both of the peer's sockets: the event loop's control socket and the torch thread's data socket.
        for address in (peers[0], data):
            stop = threading.Event()
            async with asyncio.TaskGroup() as tg:
                fuzzing = tg.create_task(asyncio.to_thread(fuzz_peer, address, pipe.deployment.dep_id, stop))
                while not stop.is_set() or rounds == 0:
                    assert await bounded(pipe.generate_all(PROMPTS, 12), 60) == want
                    rounds += 1
            assert fuzzing.result() == 150
        async with PeerClient(peers[0]) as peer:
            status = await peer.ping()
    assert rounds >= 2
    assert status["state"] == "loaded" and status["errors"] >= 300
