"""The shard server: one per peer, hosting the stage its deployment gives it.

    async with ShardServer(ServerConfig(bind_host="127.0.0.1", port=0, threads=1, info={...})) as server:
        print(server.address)          # tcp://127.0.0.1:PORT
        await server.serve_forever()   # until server.close()

One task receives (and answers PING/PROBE/INFO at once, so heartbeats are never
stuck behind compute); one task runs the jobs that touch the shard (LOAD, OPEN,
CLOSE, UNLOAD, STEP) in arrival order on a single dedicated torch thread, so the
event loop keeps serving while a step computes. Each STEP's result goes straight
to the next stage, or, on the last stage, as token ids to the source.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import msgpack
import psutil
import torch
import zmq

from swarm.runtime import sockets
from swarm.runtime.wire import DEFAULT_LIMITS, DTYPES, Kind, Message, WireError, WireLimits, decode, encode, error_reply

log = logging.getLogger(__name__)

CONTROL_KINDS = frozenset({Kind.PING, Kind.PROBE, Kind.INFO})
JOB_KINDS = frozenset({Kind.LOAD, Kind.UNLOAD, Kind.OPEN, Kind.CLOSE, Kind.STEP})
FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16"})


@dataclass(frozen=True)
class ServerConfig:
    bind_host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    threads: int = 1  # torch intra-op threads for this process
    info: Mapping[str, Any] = field(default_factory=dict)  # returned verbatim by INFO
    # Models this peer holds, by fingerprint: a LOAD naming one loads this peer's own copy.
    models: Mapping[str, str] = field(default_factory=dict)
    device: str = "cpu"
    limits: WireLimits = DEFAULT_LIMITS

    def __post_init__(self) -> None:
        try:  # INFO replies carry it as is: refuse at start-up what msgpack cannot send
            msgpack.packb(dict(self.info), use_bin_type=True)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"ServerConfig.info must be plain JSON-like data: {exc}") from None


@dataclass
class _Stage:
    """The shard currently hosted and where its outputs go."""

    dep: int
    shard: Any  # swarm.model.shard.Shard
    next_address: str | None
    next_sock: Any  # blocking DEALER to the next stage, used only on the torch thread; None on the last stage


@dataclass
class _Counters:
    busy_s: float = 0.0
    steps: int = 0
    tokens: int = 0  # real (unpadded) token positions computed
    rows: int = 0
    errors: int = 0


class ShardServer:
    """An asyncio ZeroMQ server for one peer. ``async with`` binds; ``close()`` is idempotent."""

    def __init__(self, config: ServerConfig = ServerConfig()) -> None:
        self.config = config
        self.address = ""
        self._ctx = None
        self._data_ctx = None  # plain zmq context for the torch thread's forwarding socket
        self._sock = None
        self._executor: ThreadPoolExecutor | None = None
        self._jobs: asyncio.Queue[tuple[bytes, Message]] = asyncio.Queue()
        self._stage: _Stage | None = None
        self._counters = _Counters()
        self._started = time.monotonic()
        self._stop = asyncio.Event()
        self._idle = asyncio.Event()  # set when serve_forever is not running
        self._idle.set()

    async def __aenter__(self) -> "ShardServer":
        torch.set_num_threads(self.config.threads)
        self._ctx = sockets.new_context()
        self._data_ctx = sockets.new_sync_context()
        limits = self.config.limits
        self._sock, self.address = sockets.bind_router(
            self._ctx, self.config.bind_host, self.config.port,
            max_frame_bytes=max(limits.max_tensor_bytes, limits.max_header_bytes))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard")
        log.info("shard server listening on %s", self.address)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def close(self) -> None:
        """Ask serve_forever to return (safe to call any number of times, from the loop)."""
        self._stop.set()

    async def aclose(self) -> None:
        self.close()
        await self._idle.wait()
        if self._executor is not None:  # first: a step may still be running on it
            self._executor.shutdown(wait=True)
            self._executor = None
        self._drop_stage()
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
                tasks = [tg.create_task(self._receive_loop()), tg.create_task(self._job_loop())]
                await self._stop.wait()
                for task in tasks:
                    task.cancel()
        finally:
            self._idle.set()

    # ------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        stage = self._stage
        c = self._counters
        return {
            "state": "loaded" if stage else "idle",
            "dep": stage.dep if stage else None,
            "start": stage.shard.start if stage else None,
            "end": stage.shard.end if stage else None,
            "queued": self._jobs.qsize(),
            "busy_s": c.busy_s,
            "steps": c.steps,
            "tokens": c.tokens,
            "rows": c.rows,
            "errors": c.errors,
            "uptime_s": time.monotonic() - self._started,
        }

    # ------------------------------------------------------------ receiving

    async def _send(self, identity: bytes, message: Message) -> None:
        try:
            await self._sock.send_multipart([identity, *encode(message)], copy=False)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: that peer went away; nothing to answer
            log.warning("cannot send %s to %r: %s", message.kind.value, identity, exc)

    async def _receive_loop(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            identity, body = frames[0].bytes, frames[1:]
            try:
                message = decode(body, self.config.limits)
            except WireError as exc:
                self._counters.errors += 1
                await self._send(identity, error_reply(str(exc)))
                continue
            if message.kind in CONTROL_KINDS:
                await self._send(identity, self._answer_control(message))
            elif message.kind in JOB_KINDS:
                self._jobs.put_nowait((identity, message))
            else:
                self._counters.errors += 1
                await self._send(identity, error_reply(f"a peer does not accept {message.kind.value!r}", message))

    def _answer_control(self, message: Message) -> Message:
        if message.kind is Kind.PING:
            return Message(Kind.PONG, {"status": self.status()}, re=message.id)
        if message.kind is Kind.INFO:
            return Message(Kind.INFO, {"info": dict(self.config.info)}, re=message.id)
        size = message.get("reply_bytes", 0)
        if size > self.config.limits.max_tensor_bytes:
            return error_reply(f"reply_bytes {size} over the limit of {self.config.limits.max_tensor_bytes}", message)
        return Message(Kind.PROBE, {"reply_bytes": 0}, (torch.zeros(size, dtype=torch.uint8),), re=message.id)

    # ------------------------------------------------------------ jobs (the torch thread)

    async def _on_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _job_loop(self) -> None:
        while True:
            identity, message = await self._jobs.get()
            try:
                if message.kind is Kind.STEP:
                    await self._step(message)
                    continue
                reply = await self._control_job(message)
            except Exception as exc:  # any failure is answered; the server keeps serving
                self._counters.errors += 1
                log.warning("%s failed: %s", message.kind.value, exc)
                reply = error_reply(f"{message.kind.value} failed: {exc}", message)
                if message.kind is Kind.STEP:  # the source is waiting for this step's tokens
                    identity = message["src"]
            await self._send(identity, reply)

    async def _control_job(self, message: Message) -> Message:
        if message.kind is Kind.LOAD:
            return await self._load(message)
        if message.kind is Kind.UNLOAD:
            self._drop_stage()
            return Message(Kind.OK, re=message.id)
        shard = self._loaded_shard()
        slots = message["slots"]
        for slot in slots:
            if slot >= shard.max_slots:
                raise WireError(f"slot {slot} out of range (the shard has {shard.max_slots})")
        if message.kind is Kind.OPEN:
            from swarm.model.sampling import SamplingParams

            params = SamplingParams(
                temperature=message.get("temperature", 0.0), top_k=message.get("top_k", 0),
                top_p=message.get("top_p", 1.0), seed=message.get("seed"),
            )
            await self._on_worker(lambda: [shard.open_slot(s, sampling=params) for s in slots])
        else:
            await self._on_worker(lambda: [shard.free_slot(s) for s in slots])
        return Message(Kind.OK, re=message.id)

    def _loaded_shard(self):
        if self._stage is None:
            raise WireError("no shard loaded (send LOAD first)")
        return self._stage.shard

    def _drop_stage(self) -> None:
        if self._stage is not None and self._stage.next_sock is not None:
            self._stage.next_sock.close()
        self._stage = None

    def _model_folder(self, path: str, fingerprint: str | None) -> Path:
        """This peer's own copy of the model when it holds one with that fingerprint, else the path as sent."""
        if fingerprint and fingerprint in self.config.models:
            return Path(self.config.models[fingerprint])
        if fingerprint and self.config.models:
            raise WireError(f"this peer holds model(s) {sorted(self.config.models)}, not {fingerprint!r}")
        if not Path(path).is_dir():
            raise WireError(f"model folder {path!r} not found on this peer")
        return Path(path)

    async def _load(self, message: Message) -> Message:
        start, end, dtype = message["start"], message["end"], message["dtype"]
        if not start < end:
            raise WireError(f"empty unit range [{start}, {end})")
        if dtype not in FLOAT_DTYPES:
            raise WireError(f"dtype {dtype!r} is not one of {sorted(FLOAT_DTYPES)}")
        if not (message["slots"] >= 1 and message["max_len"] >= 1):
            raise WireError("slots and max_len must be at least 1")
        model_dir = self._model_folder(message["model"], message.get("fp"))
        from swarm.model.shard import Shard

        self._drop_stage()
        began = time.perf_counter()
        shard = await self._on_worker(
            lambda: Shard.load(model_dir, start, end, max_slots=message["slots"], max_len=message["max_len"],
                               dtype=DTYPES[dtype], device=self.config.device)
        )
        load_s = time.perf_counter() - began
        nxt = message.get("next")
        next_sock = sockets.connect_dealer(self._data_ctx, nxt) if nxt else None
        self._stage = _Stage(message["dep"], shard, nxt, next_sock)
        log.info("loaded units [%d, %d) in %.2f s, next=%s", start, end, load_s, nxt)
        return Message(Kind.READY, {
            "load_s": load_s, "weight_bytes": int(shard.weight_bytes), "kv_bytes": int(shard.kv_cache_bytes),
            "rss_bytes": psutil.Process(os.getpid()).memory_info().rss,
        }, re=message.id)

    def _check_step(self, message: Message) -> tuple[Any, list[int], torch.Tensor, list[int] | None]:
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
        return shard, slots, x, lengths

    async def _step(self, message: Message) -> None:
        _, slots, x, lengths = self._check_step(message)
        ids = {k: message[k] for k in ("dep", "mb", "step", "slots")}
        out, compute_s = await self._on_worker(self._compute, self._stage, message, ids, x, lengths)
        c = self._counters
        c.busy_s += compute_s
        c.steps += 1
        c.rows += len(slots)
        c.tokens += sum(lengths) if lengths is not None else x.shape[0] * x.shape[1]
        if out is not None:  # the last stage: token ids home to the source
            await self._send(message["src"], Message(Kind.TOKENS, ids, (out,)))

    @staticmethod
    def _compute(stage: _Stage, message: Message, ids: dict, x: torch.Tensor, lengths: list[int] | None):
        """On the torch thread: run the step and forward its hidden states straight on.

        Returns (token ids or None when forwarded, seconds spent computing).
        """
        began = time.perf_counter()
        out = stage.shard.step(ids["slots"], x, lengths)
        compute_s = time.perf_counter() - began
        if stage.next_sock is None:
            return out, compute_s
        forward = Message(Kind.STEP, {**ids, "lengths": lengths, "src": message["src"]}, (out,))
        # NOBLOCK: a next stage that stopped reading must fail this step, not hang the thread.
        stage.next_sock.send_multipart(encode(forward), copy=False, flags=zmq.NOBLOCK)
        return None, compute_s
