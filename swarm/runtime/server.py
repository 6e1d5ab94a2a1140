"""The shard server: one per peer, hosting the stage its deployment gives it.

    async with ShardServer(ServerConfig(bind_host="127.0.0.1", port=0, threads=1, info={...})) as server:
        print(server.address)          # tcp://127.0.0.1:PORT, the control socket
        server.data_port               # where the pipeline's steps arrive
        await server.serve_forever()   # until server.close()

Two sockets, two owners. The event loop owns the control socket: it answers PING,
PROBE and INFO at once (heartbeats are never stuck behind compute) and passes the
jobs that touch the shard (LOAD, OPEN, CLOSE, UNLOAD) in arrival order to the torch
thread (``swarm.runtime.worker``). The torch thread owns the data socket: it
receives each STEP, computes it and sends the result straight to the next stage,
or, on the last stage, token ids to the source, without the event loop.

A member that misbehaves (a bug, a flood) is bounded per client identity: only the
client that loaded the shard (its deployment's source) opens and closes its KV
slots, and at most max_sessions_per_client of them; control requests it has
queued, bytes it has queued on the data socket, the size of every frame and how
long any request may take are bounded too. Past a bound a client gets an error
reply, and the peer keeps serving everyone else with bounded memory. (LOAD itself
is open to every member: that is how a new plan takes a peer over.)
"""
from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import msgpack
import psutil
import torch
import zmq

from swarm.aio import wait_event
from swarm.model.dtypes import FLOAT_DTYPES, torch_dtype
from swarm.model.unitfiles import cached_units, held_form, holds_units, units_dir
from swarm.model.units import QUANT_MODES
from swarm.runtime import sockets
from swarm.runtime.client import PeerClient
from swarm.runtime.holder import WEIGHT_KINDS, WeightsHolder, answer_weights
from swarm.runtime.transfer import Progress, TransferConfig, describe, fetch_units
from swarm.runtime.wire import DEFAULT_LIMITS, Kind, Message, WireError, WireLimits, decode, encode, error_reply
from swarm.runtime.worker import TorchWorker

log = logging.getLogger(__name__)

CONTROL_KINDS = frozenset({Kind.PING, Kind.PROBE, Kind.INFO})
PROGRESS_EVERY_S = 1.0  # between a transfer's log lines and PROGRESS messages to its loader
JOB_KINDS = frozenset({Kind.LOAD, Kind.UNLOAD, Kind.OPEN, Kind.CLOSE})


def _sendable(info: Mapping[str, Any]) -> None:
    """Refuse, where it is made, an INFO that msgpack cannot send."""
    try:
        msgpack.packb(dict(info), use_bin_type=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None


class WeightsFrom(enum.Enum):
    OWN = "own"  # this peer's own copy of the model (ServerConfig.models)
    CACHE = "cache"  # unit files already in its cache
    PATH = "path"  # the LOAD's path, on this machine's disk
    HOLDER = "holder"  # unit files fetched from the LOAD's holder


def weights_from(fingerprint: str | None, *, own: bool, cached: bool, path_exists: bool, local_paths: bool,
                 holder: str | None, models: list[str], path: str) -> WeightsFrom:
    """Where a LOAD's weights come from: this peer's own copy of the fingerprint; else its unit
    cache, when that holds the whole range; else, when the LOAD names a holder, the path sent if
    it exists here and may be read (``ServerConfig.local_paths``), or the holder. A LOAD without
    a holder (an older source) gets the path, unless this peer serves a model of its own (peers
    with other weights never mix). Raises WireError saying what is missing."""
    if own:
        return WeightsFrom.OWN
    if cached:
        return WeightsFrom.CACHE
    if fingerprint and holder:
        if path_exists and local_paths:
            return WeightsFrom.PATH
        if not fingerprint.isalnum():
            raise WireError(f"fingerprint {fingerprint!r} is not a fingerprint")
        return WeightsFrom.HOLDER
    if fingerprint and models:
        raise WireError(f"this peer holds model(s) {models}, not {fingerprint!r}, and the LOAD names no holder")
    if path_exists:
        return WeightsFrom.PATH
    raise WireError(f"model {path!r} (a folder or a GGUF file) not found on this peer, "
                    "and the LOAD names no holder to fetch its weights from")


@dataclass(frozen=True)
class ServerConfig:
    bind_host: str = "127.0.0.1"
    port: int = 0  # control socket; 0: any free port
    data_port: int = 0  # data socket (pipeline steps); 0: any free port
    threads: int = 1  # torch intra-op threads for this process
    info: Mapping[str, Any] = field(default_factory=dict)  # returned verbatim by INFO (see publish_info)
    # Models this peer holds, by fingerprint: a LOAD naming one loads this peer's own copy.
    models: Mapping[str, str] = field(default_factory=dict)
    device: str = "cpu"
    quant: str | None = None  # int8 | int4: every shard this peer loads from its own models is quantized so
    # A LOAD's path that exists here is read in place (peers on the source's machine, a shared disk)
    # rather than fetched from the LOAD's holder. False: fetched (a path is still read when the
    # LOAD names no holder: it is all there is).
    local_paths: bool = True
    transfer: TransferConfig = field(default_factory=TransferConfig)
    limits: WireLimits = DEFAULT_LIMITS

    def __post_init__(self) -> None:
        try:  # INFO replies carry it as is: refuse at start-up what msgpack cannot send
            _sendable(self.info)
        except ValueError as exc:
            raise ValueError(f"ServerConfig.info must be plain JSON-like data: {exc}") from None


class ShardServer:
    """An asyncio ZeroMQ server for one peer. ``async with`` binds; ``close()`` is idempotent."""

    def __init__(self, config: ServerConfig = ServerConfig()) -> None:
        self.config = config
        self.address = ""
        self._ctx = None
        self._data_ctx = None  # plain zmq context for the torch thread's sockets
        self._sock = None
        self._worker: TorchWorker | None = None
        # (identity, message, when it arrived); at most max_requests_per_client per identity
        self._jobs: asyncio.Queue[tuple[bytes, Message, float]] = asyncio.Queue()
        self._requests: Counter[bytes] = Counter()  # control requests queued or running, per identity
        self._deployer: bytes | None = None  # the client that loaded the shard: it alone opens slots
        self._open_slots: set[int] = set()
        self._info: dict[str, Any] = dict(config.info)
        self._control_errors = 0  # the torch thread counts its own
        self._control_received = 0
        self._started = time.monotonic()
        self._stop = asyncio.Event()
        self._idle = asyncio.Event()  # set when serve_forever is not running
        self._idle.set()
        self.leaving = False  # announced in every PONG: sources move their stages away
        self._unloaded = asyncio.Event()  # set while no shard is loaded
        self._unloaded.set()
        self.weights = WeightsHolder(config.models, config.quant)  # answers MANIFEST / UNIT / FETCH
        self._transfer: dict[str, Any] | None = None  # weights on their way here (PING shows it)
        self._cached: dict[str, dict[str, list[int]]] = {}  # unit files in the cache (PING shows it)
        self._tg: asyncio.TaskGroup | None = None  # serve_forever's: weight requests run in it
        self._load_timeout = None  # the running LOAD's bound: a transfer's progress pushes it on

    async def __aenter__(self) -> "ShardServer":
        torch.set_num_threads(self.config.threads)
        self._ctx = sockets.new_context()
        self._data_ctx = sockets.new_sync_context()
        limits = self.config.limits
        try:
            self._sock, self.address = sockets.bind_router(
                self._ctx, self.config.bind_host, self.config.port,
                max_frame_bytes=limits.max_frame_bytes)
            self._worker = TorchWorker(self._data_ctx, self.config.threads, limits)
            self._worker.start(self.config.bind_host, self.config.data_port)
            self._cached = await asyncio.to_thread(cached_units)
        except BaseException:
            await self.aclose()
            raise
        log.info("shard server listening on %s (data port %d)", self.address, self.data_port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def data_port(self) -> int:
        return self._worker.port if self._worker is not None else 0

    def close(self) -> None:
        """Ask serve_forever to return (safe to call any number of times, from the loop)."""
        self._stop.set()

    async def aclose(self) -> None:
        self.close()
        await self._idle.wait()
        if self._worker is not None:  # first: a step may still be running on it
            self._worker.join()
            self._worker = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for ctx in (self._ctx, self._data_ctx):
            if ctx is not None:
                ctx.term()
        self._ctx = self._data_ctx = None

    async def serve_forever(self) -> None:
        if self._sock is None:
            raise RuntimeError("use `async with ShardServer(...)` before serve_forever()")
        self._idle.clear()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tasks = [tg.create_task(self._receive_loop()), tg.create_task(self._job_loop())]
                await self._stop.wait()
                for task in tasks:
                    task.cancel()
        finally:
            if self._worker is not None:  # a server that stopped serving computes no more steps
                self._worker.stop()
            self._idle.set()

    def publish_info(self, info: Mapping[str, Any]) -> None:
        """Answer INFO with ``info`` from now on (a swarm peer's announcement and live peers change)."""
        _sendable(info)
        self._info = dict(info)

    async def leave(self, timeout_s: float) -> bool:
        """Tell every source (in PONGs) that this peer is leaving, refuse new LOADs, and
        keep serving until the shard is unloaded or ``timeout_s`` has passed.

        True when the stages were moved away in time (or none was loaded)."""
        self.leaving = True
        return await wait_event(self._unloaded, timeout_s)

    # ------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        worker = self._worker
        stage = worker.stage if worker else None
        c = worker.counters if worker else None
        return {
            "state": "loaded" if stage else "idle",
            "leaving": self.leaving,
            "dep": stage.dep if stage else None,
            "start": stage.shard.start if stage else None,
            "end": stage.shard.end if stage else None,
            "data_port": self.data_port,
            "queued": worker.queued if worker else 0,
            "busy_s": c.busy_s if c else 0.0,
            "steps": c.steps if c else 0,
            "tokens": c.tokens if c else 0,
            "rows": c.rows if c else 0,
            "errors": self._control_errors + (c.errors if c else 0),
            # every message a handler saw, on both sockets (a stranger's never get this far)
            "received": self._control_received + (c.received if c else 0),
            "uptime_s": time.monotonic() - self._started,
            "transfer": self._transfer,  # {fp, holder, done, total, rate_bps, eta_s, ...} while weights arrive
            "cached": self._cached,  # {fingerprint: {held form: [units]}}: a planner leaves warm units in place
            "sent_weight_bytes": self.weights.sent_bytes,
        }

    # ------------------------------------------------------------ the control socket

    async def _send(self, identity: bytes, message: Message) -> None:
        try:
            # DONTWAIT: a client that stopped reading its replies must not stall everyone else's
            await self._sock.send_multipart([identity, *encode(message)], copy=False, flags=zmq.DONTWAIT)
        except zmq.Again:
            log.debug("dropped %s to %r: it is not reading its replies", message.kind.value, identity)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: that peer went away; nothing to answer
            log.debug("cannot send %s to %r: %s", message.kind.value, identity, exc)

    async def _refuse(self, identity: bytes, why: str, message: Message | None = None) -> None:
        self._control_errors += 1
        await self._send(identity, error_reply(why, message))

    async def _receive_loop(self) -> None:
        limits = self.config.limits
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            self._control_received += 1
            identity, body = frames[0].bytes, frames[1:]
            try:
                message = decode(body, limits)
            except WireError as exc:
                await self._refuse(identity, str(exc))
                continue
            if message.kind in CONTROL_KINDS:
                await self._send(identity, self._answer_control(message))
            elif message.kind in WEIGHT_KINDS:  # disk reads in threads, answered when done, any order
                if self._requests[identity] >= limits.max_requests_per_client:
                    await self._refuse(identity, f"too many requests in flight from this client "
                                                 f"(limit {limits.max_requests_per_client})", message)
                else:
                    self._requests[identity] += 1
                    self._tg.create_task(self._answer_weights(identity, message))
            elif message.kind in JOB_KINDS:
                if message.tensors:  # nothing to queue but the header: a job's memory stays small
                    await self._refuse(identity, f"{message.kind.value!r} carries no tensors", message)
                elif self._requests[identity] >= limits.max_requests_per_client:
                    await self._refuse(identity, f"too many requests in flight from this client "
                                                 f"(limit {limits.max_requests_per_client})", message)
                else:
                    self._requests[identity] += 1
                    self._jobs.put_nowait((identity, message, time.monotonic()))
            else:
                self._control_errors += 1
                where = f": send steps to the data socket (port {self.data_port})" if message.kind is Kind.STEP else ""
                await self._send(identity, error_reply(
                    f"the control socket does not accept {message.kind.value!r}{where}", message))

    def _answer_control(self, message: Message) -> Message:
        if message.kind is Kind.PING:
            return Message(Kind.PONG, {"status": self.status()}, re=message.id)
        if message.kind is Kind.INFO:
            return Message(Kind.INFO, {"info": self._info}, re=message.id)
        size = message.get("reply_bytes", 0)
        if size > self.config.limits.max_tensor_bytes:
            return error_reply(f"reply_bytes {size} over the limit of {self.config.limits.max_tensor_bytes}", message)
        return Message(Kind.PROBE, {"reply_bytes": 0}, (torch.zeros(size, dtype=torch.uint8),), re=message.id)

    async def _answer_weights(self, identity: bytes, message: Message) -> None:
        try:
            reply = await answer_weights(self.weights, message)
        finally:
            self._requests[identity] -= 1
            if not self._requests[identity]:
                del self._requests[identity]
        if reply.kind is Kind.ERROR:
            self._control_errors += 1
        await self._send(identity, reply)

    # ------------------------------------------------------------ shard jobs (run on the torch thread)

    async def _job_loop(self) -> None:
        # First job: the library's model classes (seconds to import and build the first time),
        # so that a LOAD, the one a source waits for while it recovers from a lost peer, costs
        # only its disk time. A LOAD that arrives meanwhile queues behind it.
        from swarm.model.shard import warm_up

        for folder in sorted(set(self.config.models.values())):
            try:
                # Off the torch thread: it must keep answering on the data socket meanwhile.
                await asyncio.to_thread(warm_up, Path(folder))
            except Exception as exc:  # a warm-up is an optimisation: the first LOAD pays instead
                log.warning("warming up %s failed: %s", folder, exc)
        limits = self.config.limits
        while True:
            identity, message, arrived = await self._jobs.get()
            bound = limits.load_timeout_s if message.kind is Kind.LOAD else limits.request_timeout_s
            try:
                # The bound counts from arrival: a request stuck behind a flood expires in the queue.
                async with asyncio.timeout(arrived + bound - time.monotonic()) as self._load_timeout:
                    reply = await self._job(identity, message)
            except TimeoutError:
                self._control_errors += 1
                reply = error_reply(f"{message.kind.value} not done within {bound:g} s of arriving", message)
            except Exception as exc:  # any failure is answered; the server keeps serving
                self._control_errors += 1
                # A client's mistake is its to read in the reply (a flood must not flood the log too).
                log.log(logging.DEBUG if isinstance(exc, WireError) else logging.WARNING,
                        "%s failed: %s", message.kind.value, exc)
                reply = error_reply(f"{message.kind.value} failed: {exc}", message)
            finally:
                self._load_timeout = None
                self._requests[identity] -= 1
                if not self._requests[identity]:
                    del self._requests[identity]
            await self._send(identity, reply)

    def _check_sessions(self, identity: bytes, slots: list[int], opening: bool) -> None:
        """Only the deployment's own source touches its slots, and holds at most so many open."""
        if identity != self._deployer:
            raise WireError("this peer's shard belongs to another client's deployment (send LOAD first)")
        held = len(self._open_slots | set(slots))
        if opening and held > self.config.limits.max_sessions_per_client:
            raise WireError(f"this client would hold {held} open slots "
                            f"(limit {self.config.limits.max_sessions_per_client})")

    async def _job(self, identity: bytes, message: Message) -> Message:
        worker = self._worker
        if message.kind is Kind.LOAD:
            ready = await self._load(identity, message)
            self._deployer, self._open_slots = identity, set()  # the new shard's slots are its loader's
            return ready
        if message.kind is Kind.UNLOAD:
            stage, dep = worker.stage, message.get("dep")
            if stage is not None and dep is not None and dep != stage.dep:
                # an old deployment's farewell, arriving after a newer one loaded this peer
                return Message(Kind.OK, re=message.id)
            self._deployer, self._open_slots = None, set()
            await worker.call(worker.uninstall)
            self._unloaded.set()
            return Message(Kind.OK, re=message.id)
        if worker.stage is None:
            raise WireError("no shard loaded (send LOAD first)")
        shard = worker.stage.shard
        slots = message["slots"]
        for slot in slots:
            if slot >= shard.max_slots:
                raise WireError(f"slot {slot} out of range (the shard has {shard.max_slots})")
        self._check_sessions(identity, slots, opening=message.kind is Kind.OPEN)
        if message.kind is Kind.OPEN:
            from swarm.model.sampling import SamplingParams

            params = SamplingParams(
                temperature=message.get("temperature", 0.0), top_k=message.get("top_k", 0),
                top_p=message.get("top_p", 1.0), seed=message.get("seed"),
            )
            await worker.call(lambda: [shard.open_slot(s, sampling=params) for s in slots])
            self._open_slots.update(slots)
        else:
            await worker.call(lambda: [shard.free_slot(s) for s in slots])
            self._open_slots.difference_update(slots)
        return Message(Kind.OK, re=message.id)

    async def _weights_for(self, identity: bytes, message: Message) -> tuple[Path, str | None]:
        """Where this LOAD's weights are read from (``weights_from`` decides), and their quantization."""
        fingerprint, path, start, end = message.get("fp"), message["model"], message["start"], message["end"]
        own = bool(fingerprint) and fingerprint in self.config.models
        # The form the loader holds these weights in (its fingerprint covers it); a loader that
        # does not say (an older one) gets this peer's own setting, as its own copy always does.
        quant = message.get("quant") if "quant" in message.fields and not own else self.config.quant
        if quant not in (None, *QUANT_MODES):
            raise WireError(f"quant {quant!r} is not one of {', '.join(QUANT_MODES)}")
        cache = units_dir(fingerprint, held_form(message["dtype"], quant)) if fingerprint and fingerprint.isalnum() else None
        source = weights_from(
            fingerprint, own=own, cached=cache is not None and await asyncio.to_thread(holds_units, cache, range(start, end)),
            path_exists=Path(path).exists(), local_paths=self.config.local_paths, holder=message.get("holder"),
            models=sorted(self.config.models), path=path)
        if source is WeightsFrom.OWN:
            return Path(self.config.models[fingerprint]), quant
        if source is WeightsFrom.CACHE:
            return cache, quant
        if source is WeightsFrom.PATH:
            return Path(path), quant
        return await self._fetch(identity, message, message["holder"], quant), quant

    async def _fetch(self, identity: bytes, message: Message, holder: str, quant: str | None) -> Path:
        """The LOAD's units fetched from ``holder`` into the cache, with progress logged, shown in
        PING and sent to the loader; each chunk that lands pushes the LOAD's bound on."""
        fingerprint, dtype = message["fp"], message["dtype"]
        last = [0.0, -1]  # when the last line went out, and the bytes it said
        loop = asyncio.get_running_loop()

        def on_progress(p: Progress) -> None:
            self._transfer = {"fp": fingerprint, "holder": holder, "start": message["start"], "end": message["end"],
                              **p.to_json()}
            if self._load_timeout is not None:
                self._load_timeout.reschedule(loop.time() + self.config.limits.load_timeout_s)
            now = time.monotonic()
            finished = p.total_bytes and p.done_bytes >= p.total_bytes and p.done_bytes != last[1]
            if now - last[0] >= PROGRESS_EVERY_S or finished:
                last[:] = [now, p.done_bytes]
                log.info("receiving weights %s for units [%d, %d): %s", fingerprint, message["start"],
                         message["end"], describe(p.done_bytes, p.total_bytes, p.rate_bps()))
                self._tg.create_task(self._send(identity, Message(Kind.PROGRESS, {
                    "of": message.id, "done": p.done_bytes, "total": p.total_bytes, "rate": p.rate_bps()})))

        log.info("fetching weights %s (%s) units [%d, %d) from %s", fingerprint, held_form(dtype, quant),
                 message["start"], message["end"], holder)
        try:
            async with PeerClient(holder, limits=self.config.limits) as client:
                return await fetch_units(client, fingerprint, dtype, quant, range(message["start"], message["end"]),
                                         config=self.config.transfer, on_progress=on_progress)
        finally:
            self._transfer = None
            self._cached = await asyncio.to_thread(cached_units)

    async def _load(self, identity: bytes, message: Message) -> Message:
        start, end, dtype = message["start"], message["end"], message["dtype"]
        if not start < end:
            raise WireError(f"empty unit range [{start}, {end})")
        if self.leaving:
            raise WireError("this peer is leaving the swarm")
        if dtype not in FLOAT_DTYPES:
            raise WireError(f"dtype {dtype!r} is not one of {sorted(FLOAT_DTYPES)}")
        if not (message["slots"] >= 1 and message["max_len"] >= 1):
            raise WireError("slots and max_len must be at least 1")
        model_dir, quant = await self._weights_for(identity, message)
        from swarm.model.shard import Shard

        worker, nxt = self._worker, message.get("next")
        await worker.call(worker.uninstall)  # the old shard's memory goes before the new one loads
        self._unloaded.set()
        began = time.perf_counter()
        shard = await worker.call(
            lambda: Shard.load(model_dir, start, end, max_slots=message["slots"], max_len=message["max_len"],
                               dtype=torch_dtype(dtype), device=self.config.device, quant=quant)
        )
        load_s = time.perf_counter() - began
        await worker.call(worker.install, message["dep"], shard, nxt)
        self._unloaded.clear()
        log.info("loaded units [%d, %d) in %.2f s, next=%s", start, end, load_s, nxt)
        return Message(Kind.READY, {
            "load_s": load_s, "weight_bytes": int(shard.weight_bytes), "kv_bytes": int(shard.kv_cache_bytes),
            "rss_bytes": psutil.Process(os.getpid()).memory_info().rss,
        }, re=message.id)
