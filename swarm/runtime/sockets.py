"""Every ZeroMQ socket of the runtime is created, bound and connected here.

Every TCP socket is encrypted and authenticated with CURVE (libzmq's, through
pyzmq): the swarm secret (swarm.secret) derives one server keypair, which every
ROUTER holds, and one client keypair, which every DEALER holds. A stranger knows
neither: it cannot complete the handshake as a client (it lacks the server's
public key, and the ZAP handler below admits only the members' client key), so no
frame of its ever reaches a handler, and it reads nothing of what members send.
Nothing outside this module knows: the server, the client and the scheduler make
their sockets here. ``--insecure`` (swarm.secret.INSECURE) leaves them plain.

Topology: each peer binds two ROUTERs. The control socket (its advertised
address) belongs to the event loop: heartbeats, probes, LOAD/OPEN/CLOSE. The data
socket belongs to the torch thread: pipeline steps only. Whoever talks to a peer
connects a DEALER with an explicit identity. The source connects to every peer's
data socket with one identity, so any stage can send tokens or a step's error
home through its own data socket; the source binds nothing.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import socket
import threading
from dataclasses import dataclass
from functools import lru_cache

import zmq
import zmq.asyncio
from zmq.utils import z85

from swarm import secret as swarm_secret

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks a context's ZAP handler (RFC 27)
_ZAP_THREADS = itertools.count(1)

# Messages queued per socket before sends wait: enough for every micro-batch in flight.
HIGH_WATER_MARK = 1000


@dataclass(frozen=True)
class CurveKeys:
    """The swarm's two CURVE keypairs (z85 text, as libzmq takes them), derived from its secret."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def of(cls, secret: swarm_secret.SwarmSecret) -> "CurveKeys":
        server, client = (z85.encode(secret.derive(f"curve {role} key")) for role in ("server", "client"))
        return cls(zmq.curve_public(server), server, zmq.curve_public(client), client)


@lru_cache(maxsize=8)
def _keys_for(secret: swarm_secret.SwarmSecret) -> CurveKeys:
    return CurveKeys.of(secret)


def current_keys() -> CurveKeys | None:
    """This process's keys; None when it runs --insecure (raises NoSecretError without a secret)."""
    secret = swarm_secret.current()
    return None if secret is None else _keys_for(secret)


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
    frame is ever allocated here (-1: no limit). Only members complete the handshake.
    """
    keys = current_keys()
    if keys is not None:
        _start_zap_handler(ctx, keys)
    sock = ctx.socket(zmq.ROUTER)
    _common(sock)
    if keys is not None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys.server_secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.server_public)
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


def host_of(address: str) -> str:
    """"10.0.0.2" for tcp://10.0.0.2:5555 ("::1" for tcp://[::1]:5555)."""
    return address.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")


def local_host_towards(address: str) -> str:
    """This machine's address on the interface that reaches ``address``'s host: where a
    socket that peer must connect back to (the source's weights server) is bound.
    Asks the routing table (a UDP connect sends nothing)."""
    host = host_of(address)
    if host in ("127.0.0.1", "localhost", "::1"):
        return host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))
        return probe.getsockname()[0]


def connect_dealer(ctx: zmq.Context, address: str, identity: bytes | None = None) -> zmq.Socket:
    """A DEALER connected to a peer's ROUTER at ``address`` (tcp://host:port).

    With an asyncio context it is awaited from the event loop; with a plain context it
    is a data socket that the torch thread sends on directly, so a step's output leaves
    without waking the event loop first.
    """
    keys = current_keys()
    sock = ctx.socket(zmq.DEALER)
    _common(sock)
    if keys is not None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.client_public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys.client_secret)
    sock.setsockopt(zmq.IDENTITY, identity or new_identity("peer"))
    sock.connect(address)
    return sock


# ---------------------------------------------------------------- who may connect (ZAP)

@dataclass
class Handshakes:
    """Counted by the ZAP handlers of this process (read racily, for status and tests)."""

    admitted: int = 0
    refused: int = 0


HANDSHAKES = Handshakes()


def _start_zap_handler(ctx: zmq.Context, keys: CurveKeys) -> None:
    """Once per context: a thread answering libzmq's ZAP requests, admitting the members' key only.

    It ends by itself when the context is terminated (its blocking recv fails with ETERM
    and it closes its socket, which lets ``ctx.term()`` return), so whoever owns the
    context owns the thread without knowing it exists.
    """
    # A plain context over the same libzmq context: the handler blocks in its own thread.
    plain = zmq.Context.shadow(ctx.underlying)
    handler = plain.socket(zmq.REP)
    handler.setsockopt(zmq.LINGER, 0)
    try:
        handler.bind(ZAP_ENDPOINT)
    except zmq.ZMQError as exc:  # EADDRINUSE: this context has its handler already
        handler.close()
        if exc.errno != zmq.EADDRINUSE:
            raise
        return
    member = z85.decode(keys.client_public)
    threading.Thread(target=_serve_zap, args=(handler, member), daemon=True,
                     name=f"zap-handler-{next(_ZAP_THREADS)}").start()


def _serve_zap(handler: zmq.Socket, member: bytes) -> None:
    try:
        while True:
            # RFC 27: version, request id, domain, address, identity, mechanism, credentials...
            version, request_id, _domain, address, _identity, mechanism, *credentials = handler.recv_multipart()
            ok = mechanism == b"CURVE" and credentials[:1] == [member]
            if ok:
                HANDSHAKES.admitted += 1
            else:
                HANDSHAKES.refused += 1
                log.info("refused a %s handshake from %s: not a member of this swarm",
                         mechanism.decode(errors="replace"), address.decode(errors="replace"))
            handler.send_multipart([version, request_id, b"200" if ok else b"400",
                                    b"OK" if ok else b"not a member", b"member" if ok else b"", b""])
    except zmq.ContextTerminated:
        pass
    except (zmq.ZMQError, ValueError) as exc:  # a malformed request from libzmq itself: stop admitting anyone
        log.error("ZAP handler stopped: %s", exc)
    finally:
        handler.close()
