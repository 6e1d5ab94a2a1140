"""Unit files: one unit's held weights in one file, the form they travel and are cached in.

A unit file holds exactly what ``Checkpoint.read_unit(unit, dtype, quant)`` returns:
dense tensors in ``dtype``, ``formats.QuantizedTensor`` blocks as their arrays
(``NAME.codes``, ``NAME.scales``, ``NAME.mins``), so int4 stays int4 on disk and on
the wire. The file is a valid safetensors file (8-byte header length, a JSON header,
the raw bytes) written deterministically: arrays sorted by name, the header's JSON
with sorted keys, one metadata entry naming each tensor's kind. It is written
streaming, tensor by tensor, and hashed (sha256) as it is written.

The unit files of one model in one held form live together, with a manifest:

    <cache root>/units/<weights fingerprint>/<held form>/manifest.json
                                                        /unit-003.bin ...

``held form`` is the dtype, with the quantization when there is one ("float32",
"float32-int4"). The manifest carries the model's config (a config.json-style dict),
the layout a planner and a shard need (``units.ListedLayout``'s fields), and the size
and sha256 of every unit file present. ``UnitsCheckpoint`` reads such a folder as a
``checkpoint.Checkpoint``: a shard loads from it exactly as from the original file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import struct
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from swarm.model.dtypes import dtype_name
from swarm.model.formats import QuantizedTensor, Weight
from swarm.model.store import ModelNotFoundError, cache_root
from swarm.model.units import ListedLayout, ModelLayout

FORMAT = "swarm-unit-1"
MANIFEST = "manifest.json"
DENSE = "dense"
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
              torch.uint8: "U8", torch.int64: "I64", torch.int32: "I32"}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}
_HEADER_LIMIT = 16 << 20  # a unit's header is a few KB; refuse to read a huge one
_IO_BYTES = 4 << 20  # hashing reads this much at a time


class UnitFileError(ValueError):
    """A unit file or manifest that is not what it claims (corrupt, truncated, another form)."""


@dataclass(frozen=True)
class UnitEntry:
    """One unit file as the manifest records it."""

    size: int
    sha256: str


def held_form(dtype: str, quant: str | None) -> str:
    """The folder name of a held form: "float32", "float32-int4"."""
    return dtype if quant is None else f"{dtype}-{quant}"


def units_dir(fingerprint: str, form: str, root: Path | None = None) -> Path:
    """Where the unit files of the weights ``fingerprint`` in ``form`` are cached."""
    if not fingerprint.isalnum() or not all(c.isalnum() or c == "-" for c in form):
        raise ValueError(f"bad fingerprint {fingerprint!r} or form {form!r}")
    return (root or cache_root()) / "units" / fingerprint / form


def unit_path(folder: Path, unit: int) -> Path:
    return Path(folder) / f"unit-{unit:03d}.bin"


# ---------------------------------------------------------------- one unit file

def _arrays(tensors: dict[str, Weight]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    arrays, kinds = {}, {}
    for name, weight in tensors.items():
        if isinstance(weight, QuantizedTensor):
            kinds[name] = weight.kind
            arrays.update({f"{name}.{suffix}": t for suffix, t in weight.tensors().items()})
        else:
            kinds[name] = DENSE
            arrays[name] = weight
    return arrays, kinds


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def write_unit_file(path: Path, tensors: dict[str, Weight]) -> UnitEntry:
    """Write one unit's held tensors to ``path`` (atomically: a temporary file renamed) and
    return its size and sha256. The same tensors always give the same bytes."""
    arrays, kinds = _arrays(tensors)
    header: dict = {"__metadata__": {"swarm": json.dumps({"format": FORMAT, "kinds": kinds}, sort_keys=True)}}
    offset = 0
    for name in sorted(arrays):
        t = arrays[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads its header to 8 bytes
    digest = hashlib.sha256()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for piece in (struct.pack("<Q", len(raw)), raw, *(_bytes_of(arrays[n]) for n in sorted(arrays))):
            digest.update(piece)
            f.write(piece)
    os.replace(tmp, path)
    return UnitEntry(8 + len(raw) + offset, digest.hexdigest())


def read_unit_file(path: Path) -> dict[str, Weight]:
    """The tensors a unit file holds, by Hugging Face name (each read into its own memory)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise UnitFileError(f"{path}: truncated")
        (length,) = struct.unpack("<Q", head)
        if length > _HEADER_LIMIT:
            raise UnitFileError(f"{path}: header of {length} bytes")
        try:
            header = json.loads(f.read(length))
            meta = json.loads(header.pop("__metadata__")["swarm"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UnitFileError(f"{path}: not a unit file ({exc})") from None
        if meta.get("format") != FORMAT:
            raise UnitFileError(f"{path}: format {meta.get('format')!r}, expected {FORMAT}")
        base = 8 + length
        arrays: dict[str, torch.Tensor] = {}
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            out = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(base + begin)
            if f.readinto(out.numpy()) != end - begin:
                raise UnitFileError(f"{path}: truncated in {name}")
            arrays[name] = out.view(_TORCH_DTYPES[entry["dtype"]]).reshape(entry["shape"])
    result: dict[str, Weight] = {}
    for name, kind in meta["kinds"].items():
        if kind == DENSE:
            result[name] = arrays[name]
        else:
            result[name] = QuantizedTensor(kind, arrays[f"{name}.codes"], arrays[f"{name}.scales"],
                                           arrays.get(f"{name}.mins"))
    return result


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_IO_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- the manifest

_LAYOUT_FIELDS = [f.name for f in fields(ModelLayout) if f.name != "model_dir"]


def layout_dict(layout: ModelLayout) -> dict:
    """What the manifest keeps of a layout: its sizes and its tensors (name, shape, stored type)."""
    out = {name: getattr(layout, name) for name in _LAYOUT_FIELDS}
    out["tensors"] = sorted([name, list(entry["shape"]), entry["dtype"]]
                            for name, (_, entry) in layout.tensor_locations.items())
    return out


def layout_from_dict(folder: Path, data: dict) -> ListedLayout:
    try:
        tensors = tuple((str(n), tuple(int(d) for d in shape), str(kind)) for n, shape, kind in data["tensors"])
        return ListedLayout(model_dir=Path(folder), tensor_types=tensors, **{n: data[n] for n in _LAYOUT_FIELDS})
    except (KeyError, TypeError, ValueError) as exc:
        raise UnitFileError(f"{folder}: the manifest's layout is incomplete ({exc})") from None


def new_manifest(fingerprint: str, dtype: str, quant: str | None, config: dict, layout: dict) -> dict:
    return {"format": FORMAT, "fingerprint": fingerprint, "dtype": dtype, "quant": quant,
            "config": config, "layout": layout, "units": {}}


def read_manifest(folder: Path) -> dict | None:
    """The manifest in ``folder``, or None when there is none yet."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise UnitFileError(f"{folder}: bad manifest ({exc})") from None
    if data.get("format") != FORMAT:
        raise UnitFileError(f"{folder}: manifest format {data.get('format')!r}, expected {FORMAT}")
    return data


def write_manifest(folder: Path, manifest: dict) -> None:
    """Atomically: a reader sees the old manifest or the new one, never half of one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, sort_keys=True, indent=1))
    os.replace(tmp, folder / MANIFEST)


def entry_of(manifest: dict, unit: int) -> UnitEntry | None:
    got = manifest.get("units", {}).get(str(unit))
    return None if got is None else UnitEntry(int(got["size"]), str(got["sha256"]))


def with_entry(manifest: dict, unit: int, entry: UnitEntry) -> dict:
    units = dict(manifest.get("units", {}))
    units[str(unit)] = {"size": entry.size, "sha256": entry.sha256}
    return {**manifest, "units": units}


@contextlib.contextmanager
def _locked(folder: Path):
    """Processes sharing a cache (peers on one machine) change a manifest one at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def start_manifest(folder: Path, fresh: dict) -> dict:
    """The manifest on disk for ``fresh``'s weights, written from ``fresh`` if there is none (or
    one for other weights): another process may have started it, with units already in it."""
    folder = Path(folder)
    with _locked(folder):
        manifest = read_manifest(folder)
        if manifest is None or any(manifest.get(k) != fresh[k] for k in ("fingerprint", "dtype", "quant")):
            manifest = {**fresh, "units": {}}
            write_manifest(folder, manifest)
        return manifest


def record_entry(folder: Path, unit: int, entry: UnitEntry) -> dict:
    """Add a unit's entry to the manifest on disk and return it (read, changed and replaced
    under the lock: processes sharing a cache keep each other's entries)."""
    folder = Path(folder)
    with _locked(folder):
        manifest = read_manifest(folder)
        if manifest is None:
            raise UnitFileError(f"{folder}: no manifest to record unit {unit} in")
        manifest = with_entry(manifest, unit, entry)
        write_manifest(folder, manifest)
        return manifest


def holds_units(folder: Path, units: range) -> bool:
    """Whether ``folder`` holds every unit in ``units``, each file of the size its manifest records."""
    manifest = read_manifest(folder)
    if manifest is None:
        return False
    for unit in units:
        entry = entry_of(manifest, unit)
        path = unit_path(folder, unit)
        if entry is None or not path.exists() or path.stat().st_size != entry.size:
            return False
    return True


def cached_units(root: Path | None = None) -> dict[str, dict[str, list[int]]]:
    """Every unit file in the cache: {fingerprint: {held form: [units]}} (what a peer reports, so
    that a planner can leave units where they are)."""
    out: dict[str, dict[str, list[int]]] = {}
    for path in sorted(((root or cache_root()) / "units").glob(f"*/*/{MANIFEST}")):
        try:
            manifest = read_manifest(path.parent)
        except UnitFileError:
            continue
        units = sorted(int(u) for u in manifest.get("units", {})
                       if unit_path(path.parent, int(u)).exists())
        if units:
            out.setdefault(path.parent.parent.name, {})[path.parent.name] = units
    return out


# ---------------------------------------------------------------- a folder of unit files as a checkpoint

def is_units_dir(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


class UnitsCheckpoint:
    """``checkpoint.Checkpoint`` over a folder of unit files (one model, one held form)."""

    def __init__(self, folder: Path):
        self.path = Path(folder)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise ModelNotFoundError(f"{self.path}: no {MANIFEST}")
        self.manifest = manifest
        self.layout = layout_from_dict(self.path, manifest["layout"])

    def config_dict(self) -> dict:
        return dict(self.manifest["config"])

    def read_unit(self, unit: int, dtype: torch.dtype, quant: str | None) -> dict[str, Weight]:
        held = (self.manifest["dtype"], self.manifest["quant"])
        if (dtype_name(dtype), quant) != held:
            raise UnitFileError(f"{self.path} holds {held_form(*held)}, not {held_form(dtype_name(dtype), quant)}")
        path = unit_path(self.path, unit)
        if entry_of(self.manifest, unit) is None or not path.exists():
            raise ModelNotFoundError(f"{self.path}: unit {unit} is not here")
        return read_unit_file(path)

    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def tokenizer(self):
        raise ModelNotFoundError(f"{self.path}: unit files carry no tokenizer (the source tokenizes)")
