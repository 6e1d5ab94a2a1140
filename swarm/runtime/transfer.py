"""The receiver's side of weights over the swarm: unit files fetched chunk by chunk, checked, cached.

    async with PeerClient(holder_address) as holder:
        folder = await fetch_units(holder, fingerprint, "float32", "int4", range(11, 22),
                                   on_progress=lambda p: log.info(p.describe()))
    Shard.load(folder, 11, 22, quant="int4")

For each unit the receiver does not hold yet: UNIT gives its size and sha256 (the
holder writes the unit file first if it has none), then FETCH asks for chunks of
``chunk_bytes`` with at most ``window`` of them outstanding, so neither side holds
more than window x chunk of it at once, whatever the model's size. Chunks are
appended in order to ``unit-NNN.bin.part`` and hashed as they land; a transfer that
was interrupted resumes from the .part's length. A file whose sha256 is not the
holder's is deleted and fetched again (the holder asked to check its own file),
``attempts`` times at most, then ``TransferError``. A finished file is renamed into
the cache (``unitfiles.units_dir``), where a later LOAD finds it without a transfer.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from swarm.aio import cancel_and_wait
from swarm.model.shard import return_freed_memory
from swarm.model.unitfiles import (UnitEntry, UnitFileError, entry_of, held_form, layout_from_dict, read_manifest,
                                   record_entry, start_manifest, unit_path, units_dir)
from swarm.runtime.client import PeerClient, PeerError
from swarm.runtime.wire import Kind
from swarm.sizes import describe_transfer as describe

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
WINDOW = 4  # chunks outstanding: enough to keep a link busy across its round trip
# glibc keeps freed chunk buffers (zmq's, the decryption's) in its arenas unless asked: without
# a trim now and then, a 256 MB unit left ~130 MB of them resident (4 MiB chunks; 1 MiB: ~50 MB).
TRIM_EVERY_BYTES = 32 << 20
ATTEMPTS = 3
REQUEST_TIMEOUT_S = 120.0  # one chunk, or one unit file the holder must write first (seconds for an 8B layer)
_HASH_BYTES = 4 << 20


class TransferError(RuntimeError):
    """Weights could not be fetched (the holder refused, went away, or kept sending bytes that do not match)."""


@dataclass(frozen=True)
class TransferConfig:
    chunk_bytes: int = CHUNK_BYTES
    window: int = WINDOW
    attempts: int = ATTEMPTS
    request_timeout_s: float = REQUEST_TIMEOUT_S


@dataclass
class Progress:
    """Where a transfer stands: bytes of the units it moves, how many are here, how fast they come."""

    total_bytes: int = 0  # of every unit this transfer fetches
    done_bytes: int = 0  # of those, on this disk (resumed .part files count)
    fetched_bytes: int = 0  # moved over the wire by this transfer
    started: float = field(default_factory=time.monotonic)
    units_left: int = 0

    def rate_bps(self, now: float | None = None) -> float:
        elapsed = (now if now is not None else time.monotonic()) - self.started
        return self.fetched_bytes / elapsed if elapsed > 0 else 0.0

    def eta_s(self, now: float | None = None) -> float | None:
        rate = self.rate_bps(now)
        return (self.total_bytes - self.done_bytes) / rate if rate > 0 else None

    def to_json(self) -> dict:
        eta = self.eta_s()
        return {"done": self.done_bytes, "total": self.total_bytes, "fetched": self.fetched_bytes,
                "rate_bps": self.rate_bps(), "eta_s": eta, "units_left": self.units_left}


def _held_fields(fingerprint: str, dtype: str, quant: str | None) -> dict:
    return {"fp": fingerprint, "dtype": dtype, "quant": quant}


async def _manifest(holder: PeerClient, folder: Path, fingerprint: str, dtype: str, quant: str | None,
                    config: TransferConfig) -> dict:
    """This cache's manifest for the weights, from the holder the first time."""
    manifest = read_manifest(folder)
    if manifest is not None and (manifest["fingerprint"], manifest["dtype"], manifest["quant"]) == (fingerprint, dtype, quant):
        return manifest
    reply = await holder.request(Kind.MANIFEST, _held_fields(fingerprint, dtype, quant),
                                 timeout=config.request_timeout_s)
    manifest = dict(reply["manifest"])
    if (manifest.get("fingerprint"), manifest.get("dtype"), manifest.get("quant")) != (fingerprint, dtype, quant):
        raise TransferError(f"{holder.address} answered for other weights than {fingerprint} {held_form(dtype, quant)}")
    layout_from_dict(folder, manifest.get("layout") or {})  # refuse a layout a shard could not use, now
    if not isinstance(manifest.get("config"), dict):
        raise TransferError(f"{holder.address} sent no config for {fingerprint}")
    return await asyncio.to_thread(start_manifest, folder, manifest)


async def fetch_units(holder: PeerClient, fingerprint: str, dtype: str, quant: str | None, units: range, *,
                      root: Path | None = None, config: TransferConfig = TransferConfig(),
                      on_progress: Callable[[Progress], None] | None = None) -> Path:
    """Fetch the ``units`` of the weights ``fingerprint`` held as (dtype, quant) that this cache
    lacks, from ``holder``; returns the cache folder, a checkpoint ``Shard.load`` reads."""
    folder = units_dir(fingerprint, held_form(dtype, quant), root)
    try:
        manifest = await _manifest(holder, folder, fingerprint, dtype, quant, config)
    except (PeerError, UnitFileError) as exc:
        raise TransferError(f"weights {fingerprint} from {holder.address}: {exc}") from None
    missing = [u for u in units if not _present(folder, manifest, u)]
    if not missing:
        return folder
    held = _held_fields(fingerprint, dtype, quant)
    progress = Progress(units_left=len(missing))
    entries = {}
    try:
        for unit in missing:  # sizes first: the progress knows the whole transfer's total
            reply = await holder.request(Kind.UNIT, {**held, "unit": unit}, timeout=config.request_timeout_s)
            entries[unit] = UnitEntry(reply["size"], reply["sha256"])
            part = _part(folder, unit)
            progress.total_bytes += entries[unit].size
            progress.done_bytes += min(part.stat().st_size, entries[unit].size) if part.exists() else 0
            if on_progress is not None:  # the holder may take seconds a unit to write: the LOAD lives on
                on_progress(progress)
        progress.started = time.monotonic()  # the rate counts the bytes' own time, not the holder writing its files
        for unit in missing:
            entry = await _fetch_unit(holder, held, folder, unit, entries[unit], config, progress, on_progress)
            manifest = await asyncio.to_thread(record_entry, folder, unit, entry)
            progress.units_left -= 1
    except PeerError as exc:
        raise TransferError(f"weights {fingerprint} from {holder.address}: {exc}") from None
    if on_progress is not None:
        on_progress(progress)
    log.info("received %s of weights %s from %s in %.1f s", describe(progress.done_bytes, progress.total_bytes, 0),
             fingerprint, holder.address, time.monotonic() - progress.started)
    return folder


def _present(folder: Path, manifest: dict, unit: int) -> bool:
    entry, path = entry_of(manifest, unit), unit_path(folder, unit)
    return entry is not None and path.exists() and path.stat().st_size == entry.size


def _part(folder: Path, unit: int) -> Path:
    path = unit_path(folder, unit)
    return path.with_name(path.name + ".part")


def _resume(part: Path, size: int) -> tuple[int, "hashlib._Hash"]:
    """The .part's length and the hash of what it holds (a .part longer than the unit starts over)."""
    digest = hashlib.sha256()
    if not part.exists() or part.stat().st_size > size:
        part.write_bytes(b"")
        return 0, digest
    with open(part, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BYTES), b""):
            digest.update(block)
    return part.stat().st_size, digest


def _append(f, digest, data) -> None:
    digest.update(data)
    f.write(data)
    f.flush()  # what is on disk is what a resume trusts


async def _fetch_unit(holder: PeerClient, held: dict, folder: Path, unit: int, entry: UnitEntry,
                      config: TransferConfig, progress: Progress,
                      on_progress: Callable[[Progress], None] | None) -> UnitEntry:
    part = _part(folder, unit)
    for attempt in range(config.attempts):
        have, digest = await asyncio.to_thread(_resume, part, entry.size)
        offsets = iter(range(have, entry.size, config.chunk_bytes))
        # The requests in flight are this function's: awaited in order, or cancelled on the way out.
        window: collections.deque[asyncio.Task] = collections.deque()

        def ask() -> None:
            offset = next(offsets, None)
            if offset is not None:
                length = min(config.chunk_bytes, entry.size - offset)
                window.append(asyncio.create_task(holder.request(
                    Kind.FETCH, {**held, "unit": unit, "offset": offset, "length": length},
                    timeout=config.request_timeout_s)))

        with open(part, "ab") as f:
            try:
                for _ in range(config.window):
                    ask()
                expected = have
                while window:
                    reply = await window.popleft()
                    (data,) = reply.tensors
                    if reply["unit"] != unit or reply["offset"] != expected or data.numel() == 0:
                        raise TransferError(f"unit {unit} from {holder.address}: a chunk out of place "
                                            f"(offset {reply['offset']}, expected {expected})")
                    await asyncio.to_thread(_append, f, digest, data.numpy())
                    got = data.numel()
                    expected += got
                    progress.done_bytes += got
                    progress.fetched_bytes += got
                    del reply, data  # the chunk's buffer goes now: the window bounds what is held
                    if progress.fetched_bytes // TRIM_EVERY_BYTES != (progress.fetched_bytes - got) // TRIM_EVERY_BYTES:
                        return_freed_memory()
                    if on_progress is not None:
                        on_progress(progress)
                    ask()
            finally:
                await cancel_and_wait(*window)
                for task in window:  # their failures were this one's cause, or came after it
                    if not task.cancelled():
                        task.exception()
        if digest.hexdigest() == entry.sha256 and part.stat().st_size == entry.size:
            os.replace(part, unit_path(folder, unit))
            return entry
        log.warning("unit %d from %s does not match its sha256 (attempt %d of %d): fetching it again",
                    unit, holder.address, attempt + 1, config.attempts)
        progress.done_bytes -= part.stat().st_size
        part.unlink()
        # The holder hashes its own file again (and rewrites it from its checkpoint if it changed).
        reply = await holder.request(Kind.UNIT, {**held, "unit": unit, "verify": True},
                                     timeout=config.request_timeout_s)
        if (reply["size"], reply["sha256"]) != (entry.size, entry.sha256):
            progress.total_bytes += reply["size"] - entry.size
            entry = UnitEntry(reply["size"], reply["sha256"])
    raise TransferError(f"unit {unit} of weights {held['fp']} from {holder.address} did not match its sha256 "
                        f"in {config.attempts} attempts: the holder's file or the link is corrupting it")
