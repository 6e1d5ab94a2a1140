"""A holder's unit files: written from its checkpoint on first request, one unit at a time.

    held = HeldModel(checkpoint_path, fingerprint, "float32", "int4")
    held.manifest()              # config and layout (no weights read)
    entry = held.ensure(3)       # unit 3's file exists (written now if it did not): UnitEntry(size, sha256)
    held.read_size(3)            # its size (a FETCH reads unitfiles.unit_path(held.folder, 3) in chunks)

What is written is ``Checkpoint.read_unit(unit, dtype, quant)`` (``unitfiles``): the
holder never holds more than the unit it is writing. ``ensure(unit, verify=True)``
hashes the file again and rewrites it when it no longer matches its manifest entry
(a disk that flipped a byte). Thread-safe: transfers ask from worker threads.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from swarm.model.checkpoint import open_checkpoint
from swarm.model.dtypes import torch_dtype
from swarm.model.unitfiles import (UnitEntry, entry_of, file_sha256, held_form, layout_dict, new_manifest,
                                   read_manifest, record_entry, start_manifest, unit_path, units_dir, write_unit_file)

log = logging.getLogger(__name__)


class HeldModel:
    """The unit files of one checkpoint in one held form, under the cache (``unitfiles.units_dir``)."""

    def __init__(self, checkpoint_path: Path, fingerprint: str, dtype: str, quant: str | None,
                 root: Path | None = None) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.fingerprint, self.dtype, self.quant = fingerprint, dtype, quant
        self.form = held_form(dtype, quant)
        self.folder = units_dir(fingerprint, self.form, root)
        self._writing = threading.Lock()  # one unit written at a time: its tensors are all it holds
        self._lock = threading.Lock()  # the manifest (held briefly: chunk reads go on while a unit is written)
        self._checkpoint = None
        self._manifest: dict | None = None

    def _opened(self):
        if self._checkpoint is None:
            self._checkpoint = open_checkpoint(self.checkpoint_path)
        return self._checkpoint

    def manifest(self) -> dict:
        """The manifest: config, layout, and the unit files written so far."""
        with self._lock:
            return self._current()

    def _current(self) -> dict:
        if self._manifest is None:
            found = read_manifest(self.folder)
            if found is None or found.get("fingerprint") != self.fingerprint:
                checkpoint = self._opened()
                found = start_manifest(self.folder, new_manifest(self.fingerprint, self.dtype, self.quant,
                                                                 checkpoint.config_dict(), layout_dict(checkpoint.layout)))
            self._manifest = found
        return self._manifest

    def ensure(self, unit: int, verify: bool = False) -> UnitEntry:
        """Unit ``unit``'s file, written if it is missing (or, with ``verify``, no longer matches)."""
        with self._writing:
            with self._lock:
                manifest = self._current()
            num_units = manifest["layout"]["num_layers"] + 2
            if not 0 <= unit < num_units:
                raise ValueError(f"unit {unit} is outside [0, {num_units})")
            entry, path = entry_of(manifest, unit), unit_path(self.folder, unit)
            if entry is not None and path.exists() and path.stat().st_size == entry.size:
                if not verify or file_sha256(path) == entry.sha256:
                    return entry
                log.warning("unit file %s no longer matches its sha256: writing it again", path)
            tensors = self._opened().read_unit(unit, torch_dtype(self.dtype), self.quant)
            entry = write_unit_file(path, tensors)
            del tensors
            with self._lock:
                self._manifest = record_entry(self.folder, unit, entry)
            log.info("wrote %s (%d bytes)", path, entry.size)
            return entry

    def read_size(self, unit: int) -> int:
        """The size of a unit file already written (ask ``ensure`` first)."""
        with self._lock:
            entry = entry_of(self._current(), unit)
        if entry is None:
            raise ValueError(f"unit {unit} has no file yet (ask for it first)")
        return entry.size
