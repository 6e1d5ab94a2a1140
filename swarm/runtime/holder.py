"""The holder's side of weights over the swarm: MANIFEST, UNIT and FETCH answered from unit files.

``WeightsHolder`` answers for the models a process holds (fingerprint -> checkpoint
path, as ``ServerConfig.models``): a unit's file is written from the checkpoint the
first time a receiver asks for it (``model.unitcache.HeldModel``), and every disk read
runs in a worker thread, a chunk at a time, never on the event loop and never the
whole model. A peer's ShardServer answers these on its control socket; a source,
which serves no shard, runs a ``HolderServer``: one ROUTER of its own, bound and
encrypted like every other socket (``sockets.bind_router``), so a stranger reaches
neither (the ZAP handler refuses it before any handler runs).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Mapping

import torch
import zmq

from swarm.aio import cancel_and_wait
from swarm.model.dtypes import FLOAT_DTYPES
from swarm.model.shard import return_freed_memory
from swarm.model.unitcache import HeldModel
from swarm.model.unitfiles import unit_path
from swarm.runtime import sockets
from swarm.runtime.perclient import PerClientLimit
from swarm.runtime.transfer import TRIM_EVERY_BYTES
from swarm.runtime.wire import DEFAULT_LIMITS, Kind, Message, WireError, WireLimits, decode, encode, error_reply

log = logging.getLogger(__name__)

WEIGHT_KINDS = frozenset({Kind.MANIFEST, Kind.UNIT, Kind.FETCH})
MAX_CHUNK_BYTES = 16 << 20  # the largest FETCH a holder answers: a receiver's window x this bounds both sides


class WeightsHolder:
    """Answers weight requests for ``models`` (fingerprint -> checkpoint path) held as ``quant``."""

    def __init__(self, models: Mapping[str, str | Path], quant: str | None, root: Path | None = None) -> None:
        self._models = {fp: Path(path) for fp, path in models.items()}
        self._quant = quant
        self._root = root
        self._held: dict[tuple[str, str], HeldModel] = {}
        self.sent_bytes = 0  # chunk bytes answered, for tests and status

    def holds(self, fingerprint: str | None) -> bool:
        return fingerprint in self._models

    def _held_model(self, message: Message) -> HeldModel:
        fp, dtype, quant = message["fp"], message["dtype"], message.get("quant")
        if fp not in self._models:
            raise WireError(f"this process does not hold weights {fp!r}")
        if quant != self._quant:
            raise WireError(f"weights {fp} are held as {self._quant or 'unquantized'}, not {quant or 'unquantized'}")
        if dtype not in FLOAT_DTYPES:
            raise WireError(f"dtype {dtype!r} is not one of {sorted(FLOAT_DTYPES)}")
        key = (fp, dtype)
        if key not in self._held:
            self._held[key] = HeldModel(self._models[fp], fp, dtype, quant, self._root)
        return self._held[key]

    async def answer(self, message: Message) -> Message:
        """The reply to one MANIFEST, UNIT or FETCH; raises WireError (or an OSError) on a bad one."""
        held = self._held_model(message)
        if message.kind is Kind.MANIFEST:
            manifest = await asyncio.to_thread(held.manifest)
            keep = ("format", "fingerprint", "dtype", "quant", "config", "layout")
            return Message(Kind.MODEL, {"manifest": {k: manifest[k] for k in keep}}, re=message.id)
        unit = message["unit"]
        if message.kind is Kind.UNIT:
            try:
                entry = await asyncio.to_thread(held.ensure, unit, bool(message.get("verify")))
            except ValueError as exc:
                raise WireError(str(exc)) from None
            return Message(Kind.UNIT_FILE, {"unit": unit, "size": entry.size, "sha256": entry.sha256}, re=message.id)
        length, offset = message["length"], message["offset"]
        if not 0 < length <= MAX_CHUNK_BYTES:
            raise WireError(f"length {length} is not in [1, {MAX_CHUNK_BYTES}]")
        try:
            data = await asyncio.to_thread(_read_chunk, held, unit, offset, length)
        except ValueError as exc:
            raise WireError(str(exc)) from None
        before, self.sent_bytes = self.sent_bytes, self.sent_bytes + data.numel()
        if before // TRIM_EVERY_BYTES != self.sent_bytes // TRIM_EVERY_BYTES:
            return_freed_memory()  # the chunks already sent (see transfer.TRIM_EVERY_BYTES)
        return Message(Kind.CHUNK, {"unit": unit, "offset": offset}, (data,), re=message.id)


def _read_chunk(held: HeldModel, unit: int, offset: int, length: int) -> torch.Tensor:
    """Bytes of a unit file read straight into the tensor that is sent (no second copy)."""
    size = held.read_size(unit)
    if offset > size:
        raise ValueError(f"offset {offset} is past unit {unit}'s {size} bytes")
    out = torch.empty(min(length, size - offset), dtype=torch.uint8)
    if out.numel():
        fd = os.open(unit_path(held.folder, unit), os.O_RDONLY)
        try:
            got = os.preadv(fd, [out.numpy()], offset)
        finally:
            os.close(fd)
        if got != out.numel():
            raise ValueError(f"unit {unit} is shorter on disk than its manifest says")
    return out


class HolderServer:
    """A ROUTER that answers only weight requests, for a process that serves no shard (the source).

        async with HolderServer(holder, bind_host="127.0.0.1") as server:
            server.address      # tcp://127.0.0.1:PORT: what LOAD's ``holder`` names

    Each client has at most ``limits.max_requests_per_client`` requests being answered."""

    def __init__(self, holder: WeightsHolder, bind_host: str = "127.0.0.1", port: int = 0,
                 limits: WireLimits = DEFAULT_LIMITS) -> None:
        self.holder = holder
        self._bind = (bind_host, port)
        self._limits = limits
        self.address = ""
        self._ctx = None
        self._sock = None
        self._task: asyncio.Task | None = None
        self._in_flight = PerClientLimit(limits.max_requests_per_client)

    async def __aenter__(self) -> "HolderServer":
        self._ctx = sockets.new_context()
        try:
            self._sock, self.address = sockets.bind_router(self._ctx, *self._bind,
                                                           max_frame_bytes=self._limits.max_frame_bytes)
        except BaseException:
            await self.aclose()
            raise
        self._task = asyncio.create_task(self._serve(), name=f"weights holder {self.address}")
        log.info("serving weights on %s", self.address)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop answering (idempotent); a chunk being read finishes in its thread, unanswered."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    async def _serve(self) -> None:
        async with asyncio.TaskGroup() as tg:
            while True:
                frames = await self._sock.recv_multipart(copy=False)
                identity = frames[0].bytes
                try:
                    message = decode(frames[1:], self._limits)
                except WireError as exc:
                    await self._send(identity, error_reply(str(exc)))
                    continue
                if message.kind not in WEIGHT_KINDS:
                    await self._send(identity, error_reply(f"this socket serves weights only, not "
                                                           f"{message.kind.value!r}", message))
                elif not self._in_flight.take(identity):
                    await self._send(identity, error_reply(self._in_flight.refusal(), message))
                else:
                    tg.create_task(self._answer(identity, message))

    async def _answer(self, identity: bytes, message: Message) -> None:
        try:
            reply = await answer_weights(self.holder, message)
        finally:
            self._in_flight.release(identity)
        await self._send(identity, reply)

    async def _send(self, identity: bytes, message: Message) -> None:
        try:
            await self._sock.send_multipart([identity, *encode(message)], copy=False, flags=zmq.DONTWAIT)
        except zmq.Again:  # a receiver that stopped reading must not stall the others
            log.debug("dropped %s to %r: it is not reading", message.kind.value, identity)
        except zmq.ZMQError as exc:
            log.debug("cannot send %s to %r: %s", message.kind.value, identity, exc)


async def answer_weights(holder: WeightsHolder, message: Message) -> Message:
    """``holder.answer(message)``, or the ERROR reply naming what went wrong (never raises)."""
    try:
        return await holder.answer(message)
    except Exception as exc:  # any failure is answered; the holder keeps serving
        log.log(logging.DEBUG if isinstance(exc, WireError) else logging.WARNING,
                "%s failed: %s", message.kind.value, exc)
        return error_reply(f"{message.kind.value} failed: {exc}", message)
