"""A peer's torch thread: it owns the data socket, the hosted stage and the shard's compute.

    worker = TorchWorker(ctx, threads=1, limits=DEFAULT_LIMITS)
    worker.start("127.0.0.1", port=0)        # binds the data socket; worker.port
    loaded = await worker.load(dep, lambda: Shard.load(...), next_address)   # one round trip
    await worker.open_slots(dep, [0, 1], sampling)          # between steps, in order
    worker.status                            # a frozen WorkerStatus: what the event loop reads
    worker.stop()                            # no step after the one in hand
    worker.join()                            # blocks until the thread has ended

Pipeline steps arrive on the data socket (a ROUTER that the previous stage and the
source connect to) and are received, computed and sent on by this one thread. A hop
therefore costs the wire and one thread wake-up: the event loop never touches a
step. (On a 2-vCPU machine every extra wake-up on the critical path cost about a
third of a millisecond per hop.) The event loop keeps the control socket, so
heartbeats are answered while a step computes, and hands its shard jobs (LOAD, OPEN,
CLOSE, UNLOAD) to this thread as one call each (``load``, ``open_slots``,
``free_slots``, ``unload``); they run between steps, in the order they were called.

Only this thread touches the hosted stage (``HostedStage``) and the counters. After
every pass it publishes a ``WorkerStatus``, a frozen snapshot swapped in by one
reference assignment (atomic under the GIL), so the event loop reads a consistent
status without a lock and without ever seeing the stage itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import zmq

from swarm.runtime import sockets
from swarm.runtime.wire import Kind, Message, WireError, WireLimits, decode, encode, error_reply

log = logging.getLogger(__name__)

_STOP = object()
_WAKE_ENDPOINTS = itertools.count()


@dataclass
class HostedStage:
    """The shard this peer hosts for one deployment, and where its outputs go (torch thread only)."""

    dep: int
    shard: Any  # swarm.model.shard.Shard
    next_sock: zmq.Socket | None  # DEALER to the next stage's data socket; None on the last stage
    weights: tuple = ()  # what was loaded (model, units, form, slots, length): a LOAD of the same keeps it

    def check_dep(self, dep: int) -> None:
        if dep != self.dep:
            raise WireError(f"this peer serves deployment {self.dep}, not {dep}")

    def close(self) -> None:
        if self.next_sock is not None:
            self.next_sock.close()
            self.next_sock = None


@dataclass
class Counters:
    """Written by the torch thread only; the loop reads them as published in a WorkerStatus."""

    busy_s: float = 0.0
    steps: int = 0
    tokens: int = 0  # real (unpadded) token positions computed
    rows: int = 0
    errors: int = 0
    received: int = 0  # messages taken off the data socket (handled, or refused for a limit)
    jobs: int = 0  # calls run between steps (LOAD is one)


@dataclass(frozen=True)
class WorkerStatus:
    """What the torch thread last published: the hosted stage's identity and its counters."""

    dep: int | None = None  # None: no stage hosted
    weights: tuple = ()  # HostedStage.weights
    start: int = 0
    end: int = 0
    max_slots: int = 0
    queued: int = 0  # steps received and not yet computed
    busy_s: float = 0.0
    steps: int = 0
    tokens: int = 0
    rows: int = 0
    errors: int = 0
    received: int = 0
    jobs: int = 0


@dataclass(frozen=True)
class Loaded:
    """A LOAD's outcome, measured on the torch thread."""

    load_s: float
    weight_bytes: int
    kv_bytes: int
    kept: bool = False  # the hosted shard served the LOAD: nothing was read
    kv_kept: bool = False  # ... and its KV slots stayed (it served the loader's previous deployment)


class TorchWorker:
    """The thread that computes. Everything it owns is touched by it alone, except through call()."""

    def __init__(self, ctx: zmq.Context, threads: int, limits: WireLimits) -> None:
        self._ctx = ctx  # a plain (blocking) context: nothing here is awaited
        self._threads = threads
        self._limits = limits
        self.port = 0
        self._stage: HostedStage | None = None  # torch thread only
        self._counters = Counters()  # torch thread only
        self._queued = 0  # torch thread only: steps received and not yet computed
        self._status = WorkerStatus()  # replaced whole by the torch thread, read by anyone
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._data: zmq.Socket | None = None
        self._wake_rx: zmq.Socket | None = None
        self._wake_tx: zmq.Socket | None = None  # the event loop's end
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self, bind_host: str, port: int) -> None:
        """Bind the data socket here (so a taken port fails at once) and start the thread."""
        self._data, address = sockets.bind_router(
            self._ctx, bind_host, port, max_frame_bytes=self._limits.max_frame_bytes)
        self.port = sockets.port_of(address)
        endpoint = f"inproc://torch-worker-{next(_WAKE_ENDPOINTS)}"
        self._wake_rx = self._ctx.socket(zmq.PULL)
        self._wake_rx.bind(endpoint)
        self._wake_tx = self._ctx.socket(zmq.PUSH)
        self._wake_tx.setsockopt(zmq.LINGER, 0)
        self._wake_tx.connect(endpoint)
        self._thread = threading.Thread(target=self._run, name="shard-torch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end after the step in hand (from the event loop; idempotent)."""
        if self._thread is not None and not self._stopping:
            self._stopping = True
            self._calls.put(_STOP)
            self._wake()

    def join(self) -> None:
        """Stop and wait for the thread to end (blocks for at most the step in hand)."""
        self.stop()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._wake_tx.close()

    @property
    def status(self) -> WorkerStatus:
        """The last status the torch thread published (immutable: read it from any thread)."""
        return self._status

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) on the torch thread between steps; its result or exception comes back here.
        (The jobs below are the peer's; tests use this to hold the thread.)"""
        if self._thread is None or self._stopping:
            raise RuntimeError("the torch worker is not running")
        job = concurrent.futures.Future()
        self._calls.put((fn, args, job))
        self._wake()
        return await asyncio.wrap_future(job)  # settles here via the loop, even if the caller gave up

    def _wake(self) -> None:
        # One byte per call; the thread drains them all each time round.
        self._wake_tx.send(b"", zmq.NOBLOCK)

    # ------------------------------------------------------------ the jobs, one round trip each

    async def load(self, dep: int, build: Callable[[], Any], next_address: str | None, weights: tuple = ()) -> Loaded:
        """Drop the hosted stage (its memory goes before the new one loads), build the new shard
        with ``build()`` and host it for ``dep``, sending outputs to ``next_address``: one job.
        If ``build`` raises, no stage is hosted."""
        return await self.call(self._load, dep, build, next_address, weights)

    async def rehost(self, dep: int, next_address: str | None, from_dep: int | None = None) -> Loaded:
        """Keep the hosted shard's weights for deployment ``dep`` (a re-plan left its units
        here), its outputs sent to ``next_address``: one job. Its KV slots stay as they are
        when it served ``from_dep`` (the same loader's previous deployment: the replay skips
        what they hold); otherwise every slot is emptied."""
        return await self.call(self._rehost, dep, next_address, from_dep)

    async def unload(self, dep: int | None = None) -> bool:
        """Drop the hosted stage, unless it belongs to a deployment other than ``dep`` (an old
        deployment's farewell arriving after a newer one loaded this peer). True if dropped."""
        return await self.call(self._unload, dep)

    async def open_slots(self, dep: int, slots: Sequence[int], sampling: Any) -> None:
        """Open KV slots of deployment ``dep``'s shard, each sampling with ``sampling``."""
        await self.call(self._open_slots, dep, tuple(slots), sampling)

    async def free_slots(self, dep: int, slots: Sequence[int]) -> None:
        await self.call(self._free_slots, dep, tuple(slots))

    def _load(self, dep: int, build: Callable[[], Any], next_address: str | None, weights: tuple) -> Loaded:
        self._uninstall()
        began = time.perf_counter()
        shard = build()
        load_s = time.perf_counter() - began
        next_sock = sockets.connect_dealer(self._ctx, next_address) if next_address else None
        self._stage = HostedStage(dep, shard, next_sock, weights)
        return Loaded(load_s, int(shard.weight_bytes), int(shard.kv_cache_bytes))

    def _rehost(self, dep: int, next_address: str | None, from_dep: int | None) -> Loaded:
        stage = self._stage
        if stage is None:
            raise WireError("no shard loaded to keep")
        shard = stage.shard
        kv_kept = from_dep is not None and stage.dep == from_dep
        if not kv_kept:  # another loader's sequences: the new deployment replays what it needs
            for slot in range(shard.max_slots):
                shard.free_slot(slot)
        stage.close()
        stage.next_sock = sockets.connect_dealer(self._ctx, next_address) if next_address else None
        stage.dep = dep
        return Loaded(0.0, int(shard.weight_bytes), int(shard.kv_cache_bytes), kept=True, kv_kept=kv_kept)

    def _unload(self, dep: int | None) -> bool:
        if self._stage is not None and dep is not None and dep != self._stage.dep:
            return False
        self._uninstall()
        return True

    def _hosted(self, dep: int) -> HostedStage:
        if self._stage is None:
            raise WireError("no shard loaded (send LOAD first)")
        self._stage.check_dep(dep)
        return self._stage

    def _open_slots(self, dep: int, slots: tuple[int, ...], sampling: Any) -> None:
        shard = self._hosted(dep).shard
        for slot in slots:
            shard.open_slot(slot, sampling=sampling)

    def _free_slots(self, dep: int, slots: tuple[int, ...]) -> None:
        shard = self._hosted(dep).shard
        for slot in slots:
            shard.free_slot(slot)

    def _uninstall(self) -> None:
        if self._stage is not None:
            self._stage.close()
        self._stage = None

    def _publish(self) -> None:
        """Swap in a new WorkerStatus: one assignment, so a reader sees the old one or the new one."""
        stage, c = self._stage, self._counters
        shard = stage.shard if stage is not None else None
        self._status = WorkerStatus(
            dep=stage.dep if stage is not None else None, weights=stage.weights if stage is not None else (),
            start=shard.start if shard is not None else 0, end=shard.end if shard is not None else 0,
            max_slots=shard.max_slots if shard is not None else 0, queued=self._queued,
            busy_s=c.busy_s, steps=c.steps, tokens=c.tokens, rows=c.rows, errors=c.errors,
            received=c.received, jobs=c.jobs)

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        torch.set_num_threads(self._threads)
        poller = zmq.Poller()
        poller.register(self._data, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        waiting: deque = deque()
        queued_bytes: Counter[bytes] = Counter()  # per sender identity, of what waits in `waiting`
        # Each pass does only what poll reported: right after a wake-up this thread runs
        # on a cold core, where every needless call (an exception from an empty socket,
        # say) costs ten times what it costs warm.
        try:
            while True:
                ready = dict(poller.poll(0 if waiting else None))
                if self._wake_rx in ready:
                    self._drain(self._wake_rx)
                    # Jobs first: none depends on a step still queued (the source waits for
                    # OPEN's reply before it sends that slot's first step).
                    while not self._calls.empty():
                        job = self._calls.get_nowait()
                        if job is _STOP:
                            return
                        self._counters.jobs += 1
                        self._run_job(*job, before=self._publish)
                if self._data in ready:  # take in every step that has arrived: `queued` counts them
                    self._admit(self._drain(self._data), waiting, queued_bytes)
                if waiting:
                    frames = waiting.popleft()
                    self._release(frames, queued_bytes)
                    self._queued = len(waiting)
                    try:
                        self._handle(frames)
                    except Exception:  # a bug must not end the thread: every later step would hang
                        self._counters.errors += 1
                        log.exception("unexpected failure handling a message on the data socket")
                self._publish()
        finally:
            self._uninstall()
            self._publish()
            self._data.close()
            self._wake_rx.close()

    def _admit(self, received: list, waiting: deque, queued_bytes: Counter) -> None:
        """Queue what arrived, refusing (with an error, at once) what would take one sender over its
        bound: a flooding member cannot grow this peer's memory, and everyone else's steps still flow."""
        limit = self._limits.max_queued_bytes_per_client
        for frames in received:
            self._counters.received += 1
            identity, size = frames[0].bytes, _size(frames)
            if queued_bytes[identity] + size > limit:
                self._refuse(identity, f"over {limit} bytes queued from this client: "
                                       "wait for replies before sending more")
                continue
            queued_bytes[identity] += size
            waiting.append(frames)

    @staticmethod
    def _release(frames: list, queued_bytes: Counter) -> None:
        identity = frames[0].bytes
        queued_bytes[identity] -= _size(frames)
        if queued_bytes[identity] <= 0:
            del queued_bytes[identity]

    @staticmethod
    def _drain(sock: zmq.Socket) -> list:
        """Every message waiting on sock, without blocking."""
        messages = []
        while sock.get(zmq.EVENTS) & zmq.POLLIN:
            messages.append(sock.recv_multipart(zmq.NOBLOCK, copy=False))
        return messages

    @staticmethod
    def _run_job(fn: Callable[..., Any], args: tuple, job: concurrent.futures.Future,
                 before: Callable[[], None]) -> None:
        if not job.set_running_or_notify_cancel():  # the caller gave up waiting
            return
        try:
            result = fn(*args)
        except Exception as exc:
            before()  # the caller reads the status this job left as soon as it resumes
            job.set_exception(exc)
        else:
            before()
            job.set_result(result)

    def _refuse(self, identity: bytes, problem: str, request: Message | None = None) -> None:
        """Count an error and answer it. The status is published first: whoever reads it after
        the answer arrives (a PING on the control socket) sees the error counted."""
        self._counters.errors += 1
        self._publish()
        self._reply(identity, error_reply(problem, request))

    def _reply(self, identity: bytes, message: Message) -> None:
        try:
            self._data.send_multipart([identity, *encode(message)], copy=False, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: that peer went away; EAGAIN: it stopped reading
            log.debug("cannot send %s to %r: %s", message.kind.value, identity, exc)

    def _handle(self, frames: list) -> None:
        identity = frames[0].bytes
        try:
            message = decode(frames[1:], self._limits)
        except WireError as exc:
            self._refuse(identity, str(exc))
            return
        if message.kind is Kind.PING:  # the source checks that its connection is up
            self._reply(identity, Message(Kind.PONG, {"status": {"queued": self._queued}}, re=message.id))
            return
        if message.kind is not Kind.STEP:
            self._refuse(identity, f"the data socket takes 'step' and 'ping', not {message.kind.value!r}: "
                                   "send it to the peer's control socket", message)
            return
        try:
            self._step(message)
        except Exception as exc:  # answered to the source, which is waiting for this step's tokens
            log.log(logging.DEBUG if isinstance(exc, WireError) else logging.WARNING, "step failed: %s", exc)
            self._refuse(message["src"], f"step failed: {exc}", message)

    def _check_step(self, message: Message) -> tuple[HostedStage, list[int], torch.Tensor, list[int] | None]:
        # keep and draws are checked by Shard.step, before it computes.
        stage = self._stage
        if stage is None:
            raise WireError("no shard loaded (send LOAD first)")
        if message["dep"] != stage.dep:
            raise WireError(f"step for deployment {message['dep']}, this peer serves {stage.dep}")
        shard, slots, lengths = stage.shard, message["slots"], message.get("lengths")
        (x,) = message.tensors
        if not slots or len(set(slots)) != len(slots) or max(slots) >= shard.max_slots:
            raise WireError(f"slots {slots[:8]} must be distinct and below {shard.max_slots}")
        if shard.is_first:
            want_dtype, want_ndim = torch.int64, 2
        else:
            want_dtype, want_ndim = shard.dtype, 3
        if x.dtype != want_dtype or x.dim() != want_ndim or x.shape[0] != len(slots) or x.shape[1] == 0:
            raise WireError(f"input {x.dtype} {list(x.shape)} does not fit: expected {want_dtype} "
                            f"with {want_ndim} dims and {len(slots)} rows")
        if not shard.is_first and x.shape[2] != shard.hidden_size:
            raise WireError(f"hidden size {x.shape[2]}, the shard expects {shard.hidden_size}")
        if lengths is not None and (len(lengths) != len(slots) or not all(1 <= n <= x.shape[1] for n in lengths)):
            raise WireError(f"lengths must be {len(slots)} values in [1, {x.shape[1]}]")
        return stage, slots, x, lengths

    def _step(self, message: Message) -> None:
        """Compute one step and send it straight on: to the next stage, or as token ids to the source."""
        stage, slots, x, lengths = self._check_step(message)
        ids = {k: message[k] for k in ("dep", "mb", "step", "slots")}
        keep, draws = message.get("keep"), message.get("draws")  # speculative decoding's (swarm.runtime.speculate)
        skips = message.get("skips")
        if skips:  # a replay: this stage already holds the leading positions up to skips[0]
            x, lengths = drop_held_rows(x, lengths, keep, skips[0])
            keep, skips = skips[0], skips[1:] or None
        began = time.perf_counter()
        out = stage.shard.step(slots, x, lengths, keep, draws)
        c = self._counters
        c.busy_s += time.perf_counter() - began
        c.steps += 1
        c.rows += len(slots)
        c.tokens += sum(lengths) if lengths is not None else x.shape[0] * x.shape[1]
        self._publish()  # before the output leaves: whoever gets it may read the status next
        if stage.next_sock is None:
            self._reply(message["src"], Message(Kind.TOKENS, ids, (out,)))
            return
        forward = Message(Kind.STEP, {**ids, "lengths": lengths, "keep": keep, "draws": draws, "skips": skips,
                                      "src": message["src"]}, (out,))
        # NOBLOCK: a next stage that stopped reading must fail this step, not hang the thread.
        stage.next_sock.send_multipart(encode(forward), copy=False, flags=zmq.NOBLOCK)


def drop_held_rows(x: torch.Tensor, lengths: list[int] | None, keep: list[int] | None,
                   skip: list[int]) -> tuple[torch.Tensor, list[int] | None]:
    """A replay's input without the positions this stage already holds.

    x: [B, T, ...], row r's real positions starting at ``keep[r]`` (``lengths[r]`` of them;
    None: all T); ``skip[r]``: where this stage starts computing. Returns the rows from there,
    right-padded to the widest again, and their lengths (None when every row is full)."""
    real = [x.shape[1]] * x.shape[0] if lengths is None else lengths
    if keep is None or len(skip) != len(real) or len(keep) != len(real):
        raise WireError("skips need keep and one value per row")
    drops = [s - k for s, k in zip(skip, keep)]
    if any(not 0 <= d < n for d, n in zip(drops, real)):
        raise WireError(f"skips {skip[:8]} must lie in each row's positions from keep {keep[:8]}")
    if not any(drops):
        return x, lengths
    new = [n - d for n, d in zip(real, drops)]
    out = x.new_zeros((x.shape[0], max(new), *x.shape[2:]))
    for r, (d, n) in enumerate(zip(drops, new)):
        out[r, :n] = x[r, d:d + n]
    return out, None if all(n == out.shape[1] for n in new) else new


def _size(frames: list) -> int:
    return sum(len(f) for f in frames[1:])
