"""PeerClient: a DEALER to one peer's ShardServer, with request/reply matching.

    async with PeerClient("tcp://127.0.0.1:PORT") as peer:
        status = await peer.ping()            # dict, see ShardServer.status()
        info = await peer.info()              # what the peer publishes (its profile, announcement, peers)
        rtt_s, up_bps = await peer.probe(send_bytes=1 << 20)
        ready = await peer.load(model_dir, start, end, slots=8, max_len=256)

Messages that are not replies to a request (token ids from the last stage, errors
about a pipeline step) go to ``on_message``; the pipeline engine uses that.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import zmq
from zmq.utils.monitor import parse_monitor_message

from swarm.aio import cancel_and_wait
from swarm.runtime import sockets
from swarm.runtime.wire import DEFAULT_LIMITS, Kind, Message, WireError, WireLimits, decode, encode

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0
LOAD_TIMEOUT_S = 300.0


class PeerError(RuntimeError):
    """The peer answered a request with an ERROR, or did not answer in time."""


class PeerRefused(PeerError):
    """The peer is alive and answered the request with an ERROR."""


@dataclass(frozen=True)
class Ready:
    """A peer's answer to LOAD."""

    load_s: float
    weight_bytes: int
    kv_bytes: int
    rss_bytes: int
    kept: bool = False  # the peer already held these units for the same model and cache shape
    kv_kept: bool = False  # ... and kept its KV slots (it served the LOAD's ``from_dep``)


class PeerClient:
    """Requests to one peer. ``async with`` (or ``start()``) connects and starts the reader;
    ``aclose()`` is idempotent and fails every request still waiting, at once."""

    def __init__(
        self,
        address: str,
        identity: bytes | None = None,
        on_message: Callable[[Message], None] | None = None,
        limits: WireLimits = DEFAULT_LIMITS,
        ctx=None,
        on_disconnect: Callable[[], None] | None = None,
    ) -> None:
        self.address = address
        self.identity = identity or sockets.new_identity("client")
        self._on_message = on_message
        self._limits = limits
        self._own_ctx = ctx is None
        self._ctx = ctx
        self._sock = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._progress: dict[int, Callable[[Message], None]] = {}  # request id -> its PROGRESS handler
        self._reader: asyncio.Task | None = None
        # Told when an established connection closes: a killed or stopped peer's kernel closes
        # its sockets at once, long before a heartbeat could miss (a frozen one's does not).
        self._on_disconnect = on_disconnect
        self._watcher: asyncio.Task | None = None
        self._monitor: zmq.Socket | None = None  # the connection's events, read by the watcher
        self._broken: PeerError | None = None  # why requests fail at once (closed, or the socket failed)

    def start(self) -> "PeerClient":
        """Connect and start the reader task, which this client owns (``aclose`` ends it)."""
        if self._ctx is None:
            self._ctx = sockets.new_context()
        self._sock = sockets.connect_dealer(self._ctx, self.address, self.identity)
        self._reader = asyncio.create_task(self._read_loop(), name=f"reader for {self.address}")
        if self._on_disconnect is not None:
            self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            self._watcher = asyncio.create_task(self._watch(self._monitor), name=f"connection to {self.address}")
        return self

    async def _watch(self, monitor) -> None:
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._on_disconnect()

    async def __aenter__(self) -> "PeerClient":
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        reader, self._reader = self._reader, None
        watcher, self._watcher = self._watcher, None
        self._broken = self._broken or PeerError(f"connection to {self.address} closed")
        self._fail_pending(self._broken)
        try:
            await cancel_and_wait(reader, watcher)
        finally:
            # Even when this close is itself cancelled: a socket left open would block the
            # owner's ctx.term() for good (the monitor too: closed here, not by its watcher).
            self._close_sockets()

    def _close_sockets(self) -> None:
        if self._sock is not None:
            if self._monitor is not None:
                self._sock.disable_monitor()
                self._monitor.close(linger=0)
                self._monitor = None
            self._sock.close()
            self._sock = None
        if self._own_ctx and self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def lost(self, why: str) -> None:
        """The peer is known to be gone (its connection closed, its heartbeats missed): every
        request waiting on it fails now, and every later one at once, not at their timeouts."""
        self._broken = self._broken or PeerError(f"{self.address}: {why}")
        self._fail_pending(self._broken)

    def _fail_pending(self, exc: Exception) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
        self._pending.clear()

    async def _read_loop(self) -> None:
        try:
            while True:
                frames = await self._sock.recv_multipart(copy=False)
                try:
                    message = decode(frames, self._limits)
                except WireError as exc:
                    log.warning("bad message from %s: %s", self.address, exc)
                    continue
                future = self._pending.pop(message.re, None) if message.re else None
                if message.kind is Kind.PROGRESS:
                    on_progress = self._progress.get(message["of"])
                    if on_progress is not None:
                        on_progress(message)
                elif future is not None:
                    if not future.done():
                        future.set_result(message)
                elif self._on_message is not None:
                    try:
                        self._on_message(message)
                    except Exception:  # the consumer's bug: log it, keep the connection
                        log.exception("handling %s from %s failed", message.kind.value, self.address)
                else:
                    log.debug("unsolicited %s from %s", message.kind.value, self.address)
        except Exception as exc:  # the socket failed: every waiter hears it now, not at its timeout
            log.warning("connection to %s failed: %s", self.address, exc)
            self._broken = PeerError(f"connection to {self.address} failed: {exc}")
            self._fail_pending(self._broken)

    async def send(self, message: Message) -> None:
        """Send without waiting for an answer (pipeline steps)."""
        await self._sock.send_multipart(encode(message), copy=False)

    async def request(self, kind: Kind, fields: dict[str, Any] | None = None,
                      tensors: tuple[torch.Tensor, ...] = (), timeout: float = REQUEST_TIMEOUT_S,
                      on_progress: Callable[[Message], None] | None = None) -> Message:
        """Send a request and wait for its reply; an ERROR reply raises PeerError.

        With ``on_progress``, each PROGRESS message the peer sends about this request is
        handed to it and gives the reply ``timeout`` more seconds (weights on the move)."""
        if self._broken is not None:
            raise self._broken
        if self._sock is None:
            raise PeerError(f"client for {self.address} is not open")
        msg_id = next(self._ids)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Message] = loop.create_future()
        self._pending[msg_id] = future
        try:
            # The send is inside the deadline too: to a peer that stopped reading, a full
            # queue would otherwise block it for ever.
            async with asyncio.timeout(timeout) as deadline:
                if on_progress is not None:
                    def progressed(message: Message) -> None:
                        deadline.reschedule(loop.time() + timeout)
                        on_progress(message)

                    self._progress[msg_id] = progressed
                await self.send(Message(kind, fields or {}, tensors, id=msg_id))
                reply = await future
        except TimeoutError:
            raise PeerError(f"{kind.value} to {self.address}: no reply in {timeout} s") from None
        finally:
            self._pending.pop(msg_id, None)
            self._progress.pop(msg_id, None)
        if reply.kind is Kind.ERROR:
            raise PeerRefused(f"{kind.value} to {self.address}: {reply['error']}")
        return reply

    # ------------------------------------------------------------ typed requests

    async def ping(self, timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
        return (await self.request(Kind.PING, timeout=timeout))["status"]

    async def info(self) -> dict[str, Any]:
        return (await self.request(Kind.INFO)).get("info") or {}

    async def probe(self, send_bytes: int = 0, reply_bytes: int = 0,
                    timeout: float = REQUEST_TIMEOUT_S) -> float:
        """Round-trip seconds for send_bytes up and reply_bytes down (0, 0: plain RTT)."""
        payload = (torch.zeros(send_bytes, dtype=torch.uint8),) if send_bytes else ()
        began = time.perf_counter()
        await self.request(Kind.PROBE, {"reply_bytes": reply_bytes}, payload, timeout=timeout)
        return time.perf_counter() - began

    async def load(self, model_dir: Path | str, start: int, end: int, *, slots: int, max_len: int,
                   dtype: str = "float32", next_address: str | None = None, dep: int = 0,
                   fingerprint: str | None = None, timeout: float = LOAD_TIMEOUT_S, quant: str | None = None,
                   holder: str | None = None, on_progress: Callable[[Message], None] | None = None,
                   from_dep: int | None = None) -> Ready:
        """Load units [start, end). A peer that holds a model with ``fingerprint`` loads its
        own copy; otherwise its unit cache, or ``model_dir`` on its disk (same machine, shared
        disk), or the units (held as ``quant``) fetched from ``holder`` (a weights server's
        address). While weights move, ``on_progress`` gets each PROGRESS message, and each
        keeps the LOAD alive for ``timeout`` more seconds. ``from_dep``: this loader's previous
        deployment; a peer that hosted these units for it keeps its KV slots too."""
        reply = await self.request(Kind.LOAD, {
            "dep": dep, "model": str(model_dir), "start": start, "end": end, "slots": slots,
            "max_len": max_len, "dtype": dtype, "next": next_address, "fp": fingerprint,
            "quant": quant, "holder": holder, "from": from_dep,
        }, timeout=timeout, on_progress=on_progress)
        return Ready(reply["load_s"], reply["weight_bytes"], reply["kv_bytes"], reply["rss_bytes"],
                     bool(reply.get("kept", False)), bool(reply.get("kv_kept", False)))

    async def unload(self, timeout: float = REQUEST_TIMEOUT_S, dep: int | None = None) -> None:
        """Drop the shard; with ``dep``, only if that deployment's shard is the one installed."""
        await self.request(Kind.UNLOAD, {} if dep is None else {"dep": dep}, timeout=timeout)

    async def open_slots(self, slots: list[int], temperature: float = 0.0, top_k: int = 0,
                         top_p: float = 1.0, seed: int | None = None, timeout: float = REQUEST_TIMEOUT_S) -> None:
        await self.request(Kind.OPEN, {"slots": slots, "temperature": temperature, "top_k": top_k,
                                       "top_p": top_p, "seed": seed}, timeout=timeout)

    async def close_slots(self, slots: list[int], timeout: float = REQUEST_TIMEOUT_S) -> None:
        await self.request(Kind.CLOSE, {"slots": slots}, timeout=timeout)
