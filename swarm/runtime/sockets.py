"""Every ZeroMQ socket of the runtime is created, bound and connected here.

Keeping this in one module is what lets CURVE authentication and encryption be
added later (a join secret -> keypairs, set on these sockets) without touching
the server, the client or the scheduler.

Topology: each peer binds two ROUTERs. The control socket (its advertised
address) belongs to the event loop: heartbeats, probes, LOAD/OPEN/CLOSE. The data
socket belongs to the torch thread: pipeline steps only. Whoever talks to a peer
connects a DEALER with an explicit identity. The source connects to every peer's
data socket with one identity, so any stage can send tokens or a step's error
home through its own data socket; the source binds nothing.
"""

from __future__ import annotations

import secrets

import zmq
import zmq.asyncio

# Messages queued per socket before sends wait: enough for every micro-batch in flight.
HIGH_WATER_MARK = 1000


def new_context() -> zmq.asyncio.Context:
    return zmq.asyncio.Context()


def new_sync_context() -> zmq.Context:
    """For data sockets driven by a torch worker thread (blocking, never awaited)."""
    return zmq.Context()


def new_identity(prefix: str = "src") -> bytes:
    return f"{prefix}-{secrets.token_hex(6)}".encode()


def _common(sock: zmq.asyncio.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)  # close() never waits on a dead peer
    sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)


def bind_router(ctx: zmq.asyncio.Context, host: str, port: int,
                max_frame_bytes: int = -1) -> tuple[zmq.asyncio.Socket, str]:
    """A ROUTER bound to host:port (0 = a free port); returns it and its tcp:// address.

    A peer sending a frame over max_frame_bytes is disconnected by zmq before the
    frame is ever allocated here (-1: no limit).
    """
    sock = ctx.socket(zmq.ROUTER)
    _common(sock)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
    # Raise instead of silently dropping a message to a peer that is not connected.
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    try:
        sock.bind(f"tcp://{host}:{port}")
    except zmq.ZMQError:
        sock.close()
        raise
    address = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    return sock, address


def port_of(address: str) -> int:
    """5555 for tcp://host:5555 (IPv6 hosts included: tcp://[::1]:5555)."""
    return int(address.rsplit(":", 1)[1])


def data_address(control_address: str, data_port: int) -> str:
    """A peer's data socket: the host its control socket was reached at, with the data port.

    (The data socket is bound on the same interfaces as the control socket; the host a
    peer sees itself bound to, such as 0.0.0.0, means nothing to others.)
    """
    return f"{control_address.rsplit(':', 1)[0]}:{data_port}"


def connect_dealer(ctx: zmq.Context, address: str, identity: bytes | None = None) -> zmq.Socket:
    """A DEALER connected to a peer's ROUTER at ``address`` (tcp://host:port).

    With an asyncio context it is awaited from the event loop; with a plain context it
    is a data socket that the torch thread sends on directly, so a step's output leaves
    without waking the event loop first.
    """
    sock = ctx.socket(zmq.DEALER)
    _common(sock)
    sock.setsockopt(zmq.IDENTITY, identity or new_identity("peer"))
    sock.connect(address)
    return sock
