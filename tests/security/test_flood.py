"""A member that floods: 10,000 OPENs plus oversized, garbage and stray frames for 10 s at
one peer, while another session generates through it. Its tokens stay exact and the
peer's resident memory grows by less than 50 MB."""

from __future__ import annotations

import asyncio
import os
import time

import psutil
import pytest
import zmq

from swarm.runtime import sockets
from swarm.runtime.client import PeerClient
from swarm.runtime.engine import Pipeline
from swarm.localswarm import local_peers
from swarm.runtime.wire import Kind, Message, encode
from tests.helpers.reference import reference_generate
from tests.helpers.pipeline import config, plan_for

pytestmark = pytest.mark.slow

FLOOD_S = 10.0
OPENS = 10_000
OPEN_BURST = 8
MAX_FRAME = 1 << 20  # the peers' bound on any frame; the flood sends frames twice that
RSS_GROWTH_BOUND = 50 << 20
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12]]
NEW = 400


def peer_process(port: int) -> psutil.Process:
    for child in psutil.Process().children():
        if any(c.laddr and c.laddr.port == port for c in child.net_connections("tcp")):
            return child
    raise LookupError(f"no child process listens on {port}")


def flood(control: str, data: str, slots: int) -> dict[str, int]:
    """Send as fast as the sockets take it for FLOOD_S; count what was sent and answered."""
    ctx = zmq.Context()
    socks = [sockets.connect_dealer(ctx, control, b"flooder"), sockets.connect_dealer(ctx, data, b"flooder")]
    oversized = [b"\0" * (2 * MAX_FRAME)]
    garbage = [os.urandom(64), os.urandom(300)]
    stray = encode(Message(Kind.STEP, {"dep": 123456, "mb": 0, "step": 0, "slots": [0], "src": b"flooder"}))
    sent = {"open": 0, "oversized": 0, "garbage": 0, "stray step": 0, "replies": 0}
    began, i = time.monotonic(), 0
    try:
        while time.monotonic() - began < FLOOD_S:
            i += 1
            batch = []
            if sent["open"] < OPENS:  # every slot of the shard (held by the other session) and beyond
                batch += [("open", socks[0], encode(Message(Kind.OPEN, {"slots": [(i + k) % (slots + 2)]}, id=i)))
                          for k in range(min(OPEN_BURST, OPENS - sent["open"]))]
            if i % 400 == 0:  # zmq drops the connection at once: everything queued on it is lost too
                batch.append(("oversized", socks[i % 800 // 400], oversized))
            batch += [("garbage", socks[i % 2], garbage), ("stray step", socks[1], stray)]
            for what, sock, frames in batch:
                try:
                    sock.send_multipart(frames, flags=zmq.NOBLOCK)
                    sent[what] += 1
                except zmq.Again:  # our own queue is full (the peer dropped us for an oversized frame)
                    pass
            for sock in socks:
                while sock.poll(0):
                    sock.recv_multipart()
                    sent["replies"] += 1
            if sent["open"] >= OPENS:
                time.sleep(0.0005)  # the rest of the flood: let the generation's processes breathe a little
        return sent
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.term()


async def test_a_flooding_member_gets_errors_and_everyone_else_is_served(tiny_model_dir):
    want = reference_generate(tiny_model_dir, PROMPTS, NEW)
    with local_peers(2, threads=1, args=["--max-tensor-bytes", str(MAX_FRAME)]) as peers:
        plan = plan_for(peers, 2)
        async with PeerClient(peers[0]) as peer:
            data = sockets.data_address(peers[0], (await peer.ping())["data_port"])
        victim = peer_process(sockets.port_of(peers[0]))
        async with Pipeline(config(tiny_model_dir, plan, m=2, b=1, max_len=512)) as pipe:
            assert await pipe.generate_all(PROMPTS, 4) == [w[:4] for w in want]  # warm
            rss_before = victim.memory_info().rss
            generation = asyncio.create_task(pipe.generate_all(PROMPTS, NEW))
            sent = await asyncio.to_thread(flood, peers[0], data, 2)
            got = await generation
            rss_after = victim.memory_info().rss
        async with Pipeline(config(tiny_model_dir, plan, m=2, b=1, max_len=512)) as pipe:  # still serving
            again = await pipe.generate_all(PROMPTS, 16)
    print(f"flood: {sent}; peer RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB")
    assert sent["open"] == OPENS and sent["oversized"] > 0 and sent["garbage"] > 1000, sent
    assert sent["replies"] > 1000, sent  # the flooder was answered with errors, not ignored
    assert got == want
    assert again == [w[:16] for w in want]
    assert rss_after - rss_before < RSS_GROWTH_BOUND, f"peer RSS grew by {(rss_after - rss_before) >> 20} MB"
