"""Sockets of devices that are not members: no CURVE at all, another swarm's keys, or the
swarm's server key (as if it had leaked) with a client key of their own."""

from __future__ import annotations

import time

import torch
import zmq

from swarm.runtime.sockets import CurveKeys
from swarm.runtime.wire import Kind, Message, encode
from swarm.secret import SwarmSecret

REPLY_WAIT_S = 1.5


def stranger_dealer(ctx: zmq.Context, address: str, how: str, member_keys: CurveKeys) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, f"stranger-{how}".encode())
    if how == "other-swarm":
        keys = CurveKeys.of(SwarmSecret.new())
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = (
            keys.server_public, keys.client_public, keys.client_secret)
    elif how == "own-client-key":  # knows the members' server key; the ZAP handler must refuse it
        public, secret = zmq.curve_keypair()
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = member_keys.server_public, public, secret
    elif how != "plain":
        raise ValueError(how)
    sock.connect(address)
    return sock


def every_request() -> list[Message]:
    """PING, INFO, LOAD, OPEN, STEP and the weight requests, each well formed: a member would answer every one."""
    return [
        Message(Kind.PING, id=1),
        Message(Kind.INFO, id=2),
        Message(Kind.LOAD, {"dep": 9, "model": "/nonexistent", "start": 0, "end": 1, "slots": 1, "max_len": 8,
                            "dtype": "float32", "next": None, "fp": None}, id=3),
        Message(Kind.OPEN, {"slots": [0], "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": None}, id=4),
        Message(Kind.STEP, {"dep": 9, "mb": 0, "step": 0, "slots": [0], "src": b"stranger"},
                (torch.tensor([[1, 2, 3]]),), id=5),
        Message(Kind.MANIFEST, {"fp": "ab" * 8, "dtype": "float32", "quant": None}, id=6),
        Message(Kind.FETCH, {"fp": "ab" * 8, "dtype": "float32", "quant": None, "unit": 1, "offset": 0,
                             "length": 1 << 20}, id=7),
    ]


def replies_to_strangers(addresses: list[str], member_keys: CurveKeys) -> dict[str, int]:
    """Send every request over every kind of stranger socket to every address; count the replies."""
    ctx = zmq.Context()
    socks = {}
    try:
        for address in addresses:
            for how in ("plain", "other-swarm", "own-client-key"):
                sock = stranger_dealer(ctx, address, how, member_keys)
                for message in every_request():
                    _send(sock, message)
                socks[f"{how} -> {address}"] = sock
        poller = zmq.Poller()
        for sock in socks.values():
            poller.register(sock, zmq.POLLIN)
        replies = {name: 0 for name in socks}
        deadline = time.monotonic() + REPLY_WAIT_S
        while (left := deadline - time.monotonic()) > 0:
            for sock, _ in poller.poll(left * 1000):
                name = next(n for n, s in socks.items() if s is sock)
                sock.recv_multipart()
                replies[name] += 1
        return replies
    finally:
        for sock in socks.values():
            sock.close()
        ctx.term()


def _send(sock: zmq.Socket, message: Message) -> None:
    # A stranger's messages wait in its own queue (the handshake never completes); never block on them.
    try:
        sock.send_multipart(encode(message), flags=zmq.NOBLOCK)
    except zmq.Again:
        pass
