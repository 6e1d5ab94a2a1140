"""Where a peer's LOAD reads its weights from, and fetching them from a holder when it must.

    incoming = IncomingWeights(limits, TransferConfig())
    folder, quant = await incoming.locate(message, models=..., own_quant=..., local_paths=True,
                                          on_chunk=push_the_load_bound_on, notify=send_to_the_loader)
    incoming.transfer    # {fp, holder, done, total, rate_bps, eta_s, ...} while weights arrive (PING shows it)
    incoming.cached      # {fingerprint: {held form: [units]}}: unit files already here

The decision (``weights_from``) is a pure function; ``IncomingWeights`` runs at most one
fetch at a time (a peer's LOADs run in order) and reports it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from pathlib import Path
from typing import Callable, Mapping

from swarm.model.unitfiles import cached_units, held_form, holds_units, units_dir
from swarm.model.units import QUANT_MODES
from swarm.runtime.client import PeerClient
from swarm.runtime.transfer import Progress, TransferConfig, describe, fetch_units
from swarm.runtime.wire import Kind, Message, WireError, WireLimits

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0  # between a transfer's log lines and PROGRESS messages to its loader


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


class IncomingWeights:
    """The unit files this peer holds, and the one transfer (if any) bringing more (event loop only)."""

    def __init__(self, limits: WireLimits, config: TransferConfig) -> None:
        self._limits = limits
        self._config = config
        self.transfer: dict | None = None
        self.cached: dict[str, dict[str, list[int]]] = {}

    async def refresh(self) -> None:
        self.cached = await asyncio.to_thread(cached_units)

    async def locate(self, message: Message, *, models: Mapping[str, str], own_quant: str | None,
                     local_paths: bool, on_chunk: Callable[[], None],
                     notify: Callable[[Message], None]) -> tuple[Path, str | None]:
        """Where this LOAD's weights are read from (``weights_from`` decides), and their
        quantization; fetched first when they come from the LOAD's holder, calling ``on_chunk``
        for every chunk that lands and ``notify`` with PROGRESS messages for the loader."""
        fingerprint, path, start, end = message.get("fp"), message["model"], message["start"], message["end"]
        own = bool(fingerprint) and fingerprint in models
        # The form the loader holds these weights in (its fingerprint covers it); a loader that
        # does not say (an older one) gets this peer's own setting, as its own copy always does.
        quant = message.get("quant") if "quant" in message.fields and not own else own_quant
        if quant not in (None, *QUANT_MODES):
            raise WireError(f"quant {quant!r} is not one of {', '.join(QUANT_MODES)}")
        cache = units_dir(fingerprint, held_form(message["dtype"], quant)) if fingerprint and fingerprint.isalnum() else None
        source = weights_from(
            fingerprint, own=own, cached=cache is not None and await asyncio.to_thread(holds_units, cache, range(start, end)),
            path_exists=Path(path).exists(), local_paths=local_paths, holder=message.get("holder"),
            models=sorted(models), path=path)
        if source is WeightsFrom.OWN:
            return Path(models[fingerprint]), quant
        if source is WeightsFrom.CACHE:
            return cache, quant
        if source is WeightsFrom.PATH:
            return Path(path), quant
        return await self._fetch(message, quant, on_chunk, notify), quant

    async def _fetch(self, message: Message, quant: str | None, on_chunk: Callable[[], None],
                     notify: Callable[[Message], None]) -> Path:
        fingerprint, dtype, holder = message["fp"], message["dtype"], message["holder"]
        last = [0.0, -1]  # when the last line went out, and the bytes it said

        def on_progress(p: Progress) -> None:
            self.transfer = {"fp": fingerprint, "holder": holder, "start": message["start"], "end": message["end"],
                             **p.to_json()}
            on_chunk()
            now = time.monotonic()
            finished = p.total_bytes and p.done_bytes >= p.total_bytes and p.done_bytes != last[1]
            if now - last[0] >= PROGRESS_EVERY_S or finished:
                last[:] = [now, p.done_bytes]
                log.info("receiving weights %s for units [%d, %d): %s", fingerprint, message["start"],
                         message["end"], describe(p.done_bytes, p.total_bytes, p.rate_bps()))
                notify(Message(Kind.PROGRESS, {"of": message.id, "done": p.done_bytes, "total": p.total_bytes,
                                               "rate": p.rate_bps()}))

        log.info("fetching weights %s (%s) units [%d, %d) from %s", fingerprint, held_form(dtype, quant),
                 message["start"], message["end"], holder)
        try:
            async with PeerClient(holder, limits=self._limits) as client:
                return await fetch_units(client, fingerprint, dtype, quant, range(message["start"], message["end"]),
                                         config=self._config, on_progress=on_progress)
        finally:
            self.transfer = None
            await self.refresh()
