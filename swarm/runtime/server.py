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
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import msgpack
import psutil
import torch
import zmq

from swarm.aio import wait_event
from swarm.model.dtypes import FLOAT_DTYPES, torch_dtype
from swarm.model.sampling import SamplingParams
from swarm.runtime import sockets
from swarm.runtime.holder import WEIGHT_KINDS, WeightsHolder, answer_weights
from swarm.runtime.loadweights import IncomingWeights
from swarm.runtime.perclient import PerClientLimit
from swarm.runtime.transfer import TransferConfig
from swarm.runtime.wire import DEFAULT_LIMITS, Kind, Message, WireError, WireLimits, decode, encode, error_reply
from swarm.runtime.worker import Loaded, TorchWorker, WorkerStatus

log = logging.getLogger(__name__)

CONTROL_KINDS = frozenset({Kind.PING, Kind.PROBE, Kind.INFO})
JOB_KINDS = frozenset({Kind.LOAD, Kind.UNLOAD, Kind.OPEN, Kind.CLOSE})


def _sendable(info: Mapping[str, Any]) -> None:
    """Refuse, where it is made, an INFO that msgpack cannot send."""
    try:
        msgpack.packb(dict(info), use_bin_type=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None


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
        self._requests = PerClientLimit(config.limits.max_requests_per_client)  # queued or running
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
        self.warm = False  # the models it holds warmed up (the job loop's first job): a LOAD costs its read only
        self._unloaded = asyncio.Event()  # set while no shard is loaded
        self._unloaded.set()
        self.weights = WeightsHolder(config.models, config.quant)  # answers MANIFEST / UNIT / FETCH
        self._incoming = IncomingWeights(config.limits, config.transfer)  # PING shows its transfer and cache
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
            await self._incoming.refresh()
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
        """What PING answers: the torch thread's last published status and the loop's own counts."""
        w = self._worker.status if self._worker is not None else WorkerStatus()
        loaded = w.dep is not None
        return {
            "state": "loaded" if loaded else "idle",
            "leaving": self.leaving,
            "warm": self.warm,
            "dep": w.dep,
            "start": w.start if loaded else None,
            "end": w.end if loaded else None,
            "data_port": self.data_port,
            "queued": w.queued,
            "busy_s": w.busy_s,
            "steps": w.steps,
            "tokens": w.tokens,
            "rows": w.rows,
            "jobs": w.jobs,  # calls run on the torch thread: a LOAD is one
            "errors": self._control_errors + w.errors,
            # every message a handler saw, on both sockets (a stranger's never get this far)
            "received": self._control_received + w.received,
            "uptime_s": time.monotonic() - self._started,
            "transfer": self._incoming.transfer,  # {fp, holder, done, total, rate_bps, eta_s, ...} while weights arrive
            "cached": self._incoming.cached,  # {fingerprint: {held form: [units]}}: a planner leaves warm units in place
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
                if not self._requests.take(identity):
                    await self._refuse(identity, self._requests.refusal(), message)
                else:
                    self._tg.create_task(self._answer_weights(identity, message))
            elif message.kind in JOB_KINDS:
                if message.tensors:  # nothing to queue but the header: a job's memory stays small
                    await self._refuse(identity, f"{message.kind.value!r} carries no tensors", message)
                elif not self._requests.take(identity):
                    await self._refuse(identity, self._requests.refusal(), message)
                else:
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
            self._requests.release(identity)
        if reply.kind is Kind.ERROR:
            self._control_errors += 1
        await self._send(identity, reply)

    # ------------------------------------------------------------ shard jobs (run on the torch thread)

    async def _job_loop(self) -> None:
        # First job: the library's model classes and the native kernels (about 2 s to import
        # and build the first time), so that a LOAD, the one a source waits for while it
        # recovers from a lost peer, costs only its read. A LOAD that arrives meanwhile queues
        # behind it; PING says "warm" once it is done. (Done before the peer is announced
        # instead, three local peers took 8-11 s to come up rather than 5-6.6.)
        from swarm.model.shard import warm_up

        for folder in sorted(set(self.config.models.values())):
            try:
                # Off the torch thread: it must keep answering on the data socket meanwhile.
                await asyncio.to_thread(warm_up, Path(folder))
            except Exception as exc:  # a warm-up is an optimisation: the first LOAD pays instead
                log.warning("warming up %s failed: %s", folder, exc)
        self.warm = True
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
                self._requests.release(identity)
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
        """One LOAD, UNLOAD, OPEN or CLOSE: checked here, run as one call on the torch thread."""
        worker = self._worker
        if message.kind is Kind.LOAD:
            ready = await self._load(identity, message)
            # The new shard's slots are its loader's; the open ones stay open where its KV stayed.
            self._deployer = identity
            if not ready["kv_kept"]:
                self._open_slots = set()
            return ready
        if message.kind is Kind.UNLOAD:
            if await worker.unload(message.get("dep")):  # False: a newer deployment loaded this peer
                self._deployer, self._open_slots = None, set()
                self._unloaded.set()
            return Message(Kind.OK, re=message.id)
        hosted = worker.status
        if hosted.dep is None:
            raise WireError("no shard loaded (send LOAD first)")
        slots = message["slots"]
        for slot in slots:
            if slot >= hosted.max_slots:
                raise WireError(f"slot {slot} out of range (the shard has {hosted.max_slots})")
        self._check_sessions(identity, slots, opening=message.kind is Kind.OPEN)
        if message.kind is Kind.OPEN:
            params = SamplingParams(
                temperature=message.get("temperature", 0.0), top_k=message.get("top_k", 0),
                top_p=message.get("top_p", 1.0), seed=message.get("seed"),
            )
            await worker.open_slots(hosted.dep, slots, params)
            self._open_slots.update(slots)
        else:
            await worker.free_slots(hosted.dep, slots)
            self._open_slots.difference_update(slots)
        return Message(Kind.OK, re=message.id)

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
        nxt = message.get("next")
        # The same weights in the same form with the same cache shape: a re-plan left these
        # units here, so they stay (no read, no transfer) and only the deployment and next hop change.
        weights = (message.get("fp") or message["model"], start, end, dtype, message.get("quant"),
                   message["slots"], message["max_len"])
        if self._worker.status.weights == weights:  # jobs run one at a time: nothing changes it meanwhile
            loaded = await self._worker.rehost(message["dep"], nxt, message.get("from"))
            self._unloaded.clear()
            log.info("kept units [%d, %d)%s for deployment %d, next=%s", start, end,
                     " and their KV slots" if loaded.kv_kept else "", message["dep"], nxt)
            return self._ready(loaded, message)
        loop = asyncio.get_running_loop()

        def push_bound_on() -> None:  # each chunk that lands gives the LOAD its whole bound again
            if self._load_timeout is not None:
                self._load_timeout.reschedule(loop.time() + self.config.limits.load_timeout_s)

        model_dir, quant = await self._incoming.locate(
            message, models=self.config.models, own_quant=self.config.quant, local_paths=self.config.local_paths,
            on_chunk=push_bound_on, notify=lambda m: self._tg.create_task(self._send(identity, m)))
        from swarm.model.shard import Shard

        def build() -> Shard:
            return Shard.load(model_dir, start, end, max_slots=message["slots"], max_len=message["max_len"],
                              dtype=torch_dtype(dtype), device=self.config.device, quant=quant)

        try:
            loaded = await self._worker.load(message["dep"], build, nxt, weights)  # one round trip to the torch thread
        except BaseException:
            self._unloaded.set()  # the old stage is gone whether or not the new one loaded
            raise
        self._unloaded.clear()
        log.info("loaded units [%d, %d) in %.2f s, next=%s", start, end, loaded.load_s, nxt)
        return self._ready(loaded, message)

    @staticmethod
    def _ready(loaded: Loaded, message: Message) -> Message:
        return Message(Kind.READY, {
            "load_s": loaded.load_s, "weight_bytes": loaded.weight_bytes, "kv_bytes": loaded.kv_bytes,
            "rss_bytes": psutil.Process(os.getpid()).memory_info().rss, "kept": loaded.kept,
            "kv_kept": loaded.kv_kept,
        }, re=message.id)
