"""What a shard reads its weights from: a Hugging Face folder or a GGUF file, one unit at a time.

``open_checkpoint(path)`` gives a ``Checkpoint``: its layout, its config (a
config.json-style dict), and ``read_unit``, which returns one unit's tensors under
Hugging Face names (``model.embed_tokens.weight``, ``model.layers.N.*``,
``model.norm.weight``, ``lm_head.weight``; a tied head returns the embedding
matrix as ``lm_head.weight``). Tensors are read one at a time from memory-mapped
files, never the whole file.

The held form (``units.held_kind``): with ``quant`` None every tensor is dense in
``dtype``; with "int8" / "int4" 2-D matrices are ``formats.QuantizedTensor`` blocks
(GGUF's Q8_0/Q4_0/Q4_1 kept as they are), norms and biases dense in ``dtype``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from swarm.model import formats
from swarm.model.formats import Weight
from swarm.model.store import ModelNotFoundError, is_gguf_file, model_fingerprint
from swarm.model.unitfiles import UnitsCheckpoint, is_units_dir
from swarm.model.units import (
    SUPPORTED_MODEL_TYPES, ModelLayout, UnsupportedModelError, held_kind, safetensors_files, unit_of_tensor,
)


class Checkpoint(Protocol):
    layout: ModelLayout

    def config_dict(self) -> dict:
        """The model's config as config.json holds it (model_type llama, qwen2 or mistral)."""

    def read_unit(self, unit: int, dtype: torch.dtype, quant: str | None) -> dict[str, Weight]:
        """One unit's tensors by Hugging Face name, held as ``units.held_kind`` says."""

    def fingerprint(self) -> str:
        """Same weights, same fingerprint (``store.model_fingerprint``)."""

    def tokenizer(self):
        """The model's tokenizer, with its chat template."""


class HFCheckpoint:
    """A Hugging Face folder: config.json and model.safetensors (or shards with an index)."""

    def __init__(self, model_dir: Path):
        self.path = Path(model_dir)
        self._config = json.loads((self.path / "config.json").read_text())
        model_type = self._config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(f"{self.path}: model_type {model_type!r} is not supported "
                                        f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        self.layout = ModelLayout.read(self.path)

    def config_dict(self) -> dict:
        return dict(self._config)

    def read_unit(self, unit: int, dtype: torch.dtype, quant: str | None) -> dict[str, Weight]:
        layout = self.layout
        if not 0 <= unit < layout.num_units:
            raise ValueError(f"unit {unit} is outside [0, {layout.num_units})")
        locations = layout.tensor_locations
        sources = {n: n for n in locations if unit_of_tensor(n, layout.num_layers) == unit}
        if unit == layout.num_units - 1 and "lm_head.weight" not in sources:
            sources["lm_head.weight"] = "model.embed_tokens.weight"  # tied: the head's weight is the embedding
        by_file: dict[Path, list[str]] = {}
        for name, source in sources.items():
            by_file.setdefault(locations[source][0], []).append(name)
        out: dict[str, Weight] = {}
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in names:
                    source = sources[name]
                    kind = held_kind(name, len(locations[source][1]["shape"]), locations[source][1]["dtype"], quant)
                    tensor = f.get_tensor(source)
                    # a copy: get_tensor may return a view of the file's memory map
                    out[name] = tensor.to(dtype, copy=True) if kind is None else formats.quantize(tensor.float(), kind)
                    del tensor
        return {name: out[name] for name in sources}

    def fingerprint(self) -> str:
        return model_fingerprint(self.path)

    def tokenizer(self):
        from swarm.model import hf

        return hf.load_tokenizer(self.path)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A Hugging Face model folder, a GGUF file, or a folder of unit files (``unitfiles``)."""
    path = Path(path).expanduser()
    if is_units_dir(path):
        return UnitsCheckpoint(path)
    if is_gguf_file(path):
        from swarm.model.gguf import GGUFCheckpoint

        return GGUFCheckpoint(path)
    if path.is_dir() and (path / "config.json").exists():
        try:
            safetensors_files(path)
        except FileNotFoundError:
            pass
        else:
            return HFCheckpoint(path)
    raise ModelNotFoundError(f"{path} is neither a Hugging Face model folder nor a GGUF file "
                             "(a folder needs config.json and *.safetensors)")
