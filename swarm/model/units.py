"""The unit layout of a checkpoint: what each unit is, what it weighs, what it sends.

A model with L decoder layers has N = L + 2 units: 0 is the token embedding,
1..L the decoder blocks, L+1 the final norm with the output head. Sizes come from
the safetensors headers and config.json alone (no torch, no weights read), so the
planner side can size a model it has never loaded. A GGUF file's layout
(``swarm.model.gguf``) comes from its own header the same way.

``held_kind`` is the one rule for the form a checkpoint tensor is held in
(dense, or which GGUF block kind of ``swarm.model.formats``); the checkpoint
readers follow it and the GGUF layout sizes by it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from swarm.model.dtypes import DTYPE_BYTES

TOKEN_ID_BYTES = 8  # the head stage sends int64 token ids, never logits

# Weight-only quantization to GGUF blocks of 32 along the input dimension (swarm.model.formats
# holds and computes them; the byte counts are here so the planner side can size a quantized
# model without torch): --quant int8 holds q8_0, int4 holds q4_1 (a float16 scale and min a block).
QUANT_MODES = ("int8", "int4")
QUANT_KIND = {"int8": "q8_0", "int4": "q4_1"}
BLOCK = 32
# bytes per block of 32 weights: the codes, a float16 scale, and for q4_1 a float16 min
BLOCK_BYTES = {"q8_0": 32 + 2, "q4_0": 16 + 2, "q4_1": 16 + 4}
# The output head (and the embedding) keep int8 under int4: the head's errors land straight on the
# logits, and an int8 head shares its bytes with a tied int8 embedding (llama.cpp's Q4 files keep
# the head at 6-8 bits too).
HEAD_QUANT = {"int8": "int8", "int4": "int8"}

# Families whose decoder layers share Llama's interface and whose checkpoints use the
# model.embed_tokens / model.layers.N / model.norm / lm_head names (hf.py builds them).
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


class UnsupportedModelError(ValueError):
    """The checkpoint is not a Llama-family causal LM swarm can split."""


# The held form of a 2-D matrix under --quant (swarm.model.formats' kinds, blocks of 32 along K).
FLOAT_STORAGE = ("F32", "F16", "BF16")  # safetensors' and GGUF's names for float tensors
KEPT_BLOCKS = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}  # GGUF blocks held as they are
NEAREST_BLOCKS = {"Q4_K": "q4_1"}  # other GGUF block types are re-quantized to q8_0


def held_kind(name: str, ndim: int, stored: str, quant: str | None) -> str | None:
    """The block kind a checkpoint tensor is held in, or None for a dense tensor.

    ``stored`` is the tensor's type in the file ("F32", "BF16", "Q4_1", "Q6_K", ...).
    Unquantized, or 1-D (norms, biases): dense. Quantized: GGUF's Q8_0/Q4_0/Q4_1 blocks
    are kept as they are, Q4_K becomes q4_1 and any other block type q8_0; a float
    matrix becomes q8_0 under int8, and under int4 q4_1 except the embedding and the
    head, which stay q8_0 (their errors land on every token / straight on the logits).
    """
    if quant is None or ndim != 2:
        return None
    if quant not in QUANT_MODES:
        raise ValueError(f"unknown quantization {quant!r}")
    if stored in KEPT_BLOCKS:
        return KEPT_BLOCKS[stored]
    if stored not in FLOAT_STORAGE:
        return NEAREST_BLOCKS.get(stored, "q8_0")
    if quant == "int4" and not name.startswith(("model.embed_tokens.", "lm_head.")):
        return "q4_1"
    return "q8_0"


def block_matrix_bytes(out_features: int, in_features: int, kind: str) -> int:
    """Bytes of an [out, in] matrix held in ``kind`` blocks (QuantizedTensor.nbytes)."""
    if in_features % BLOCK:
        raise ValueError(f"{kind} needs the input dimension divisible by {BLOCK}, got {in_features}")
    return out_features * (in_features // BLOCK) * BLOCK_BYTES[kind]


def check_quant(quant: str | None) -> str | None:
    """``None`` / "none" -> None; "int8" / "int4" as they are; anything else is an error."""
    if quant in (None, "none", ""):
        return None
    if quant not in QUANT_MODES:
        raise ValueError(f"unknown quantization {quant!r} (choose from none, {', '.join(QUANT_MODES)})")
    return quant


def quantized_matrix_bytes(out_features: int, in_features: int, quant: str, dtype: str = "float32") -> int:
    """Bytes of one [out, in] weight matrix held as ``quant``; one whose rows are not whole
    blocks (never the case in real models) stays in ``dtype``."""
    if in_features % BLOCK:
        return out_features * in_features * DTYPE_BYTES[dtype]
    return out_features * (in_features // BLOCK) * BLOCK_BYTES[QUANT_KIND[quant]]


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def read_safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def unit_of_tensor(name: str, num_layers: int) -> int:
    """Which unit a checkpoint tensor belongs to."""
    if name.startswith("model.embed_tokens."):
        return 0
    if name.startswith("model.layers."):
        return int(name.split(".")[2]) + 1
    if name.startswith(("model.norm.", "lm_head.")):
        return num_layers + 1
    raise ValueError(f"tensor {name!r} belongs to no unit")


@dataclass(frozen=True)
class ModelLayout:
    """Static facts about a checkpoint, read from config.json and safetensors headers."""

    model_dir: Path
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    checkpoint_dtype: str

    @classmethod
    def read(cls, model_dir: Path) -> "ModelLayout":
        """The layout of a Hugging Face folder, or of a GGUF file (``swarm.model.gguf``)."""
        model_dir = Path(model_dir)
        if model_dir.is_file():  # a checkpoint that is one file is a GGUF file
            from swarm.model.gguf import read_layout

            return read_layout(model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        heads = config["num_attention_heads"]
        return cls(
            model_dir=model_dir,
            num_layers=config["num_hidden_layers"],
            hidden_size=config["hidden_size"],
            num_kv_heads=config.get("num_key_value_heads", heads),
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab_size=config["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            checkpoint_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
        )

    @property
    def num_units(self) -> int:
        return self.num_layers + 2

    def unit_names(self) -> list[str]:
        return ["embed"] + [f"block.{i}" for i in range(self.num_layers)] + ["head"]

    @cached_property
    def tensor_locations(self) -> dict[str, tuple[Path, dict]]:
        """Checkpoint tensor name -> (file, header entry with dtype, shape, offsets)."""
        out: dict[str, tuple[Path, dict]] = {}
        for path in safetensors_files(self.model_dir):
            for name, entry in read_safetensors_header(path).items():
                out[name] = (path, entry)
        return out

    def unit_param_counts(self) -> list[int]:
        counts = [0] * self.num_units
        for name, (_, entry) in self.tensor_locations.items():
            n = 1
            for d in entry["shape"]:
                n *= d
            counts[unit_of_tensor(name, self.num_layers)] += n
        if self.tied_embeddings and "lm_head.weight" not in self.tensor_locations:
            counts[-1] += self.vocab_size * self.hidden_size  # the head holds its own copy
        return counts

    def unit_weight_bytes(self, dtype: str, quant: str | None = None) -> list[int]:
        """Bytes each unit's weights occupy once loaded in ``dtype`` (and ``quant``, if any).

        Quantized: every 2-D block weight in ``QUANT_KIND[quant]`` blocks, the embedding and
        the head in ``HEAD_QUANT[quant]``'s; norms and biases stay in ``dtype``.
        """
        if quant is None:
            return [n * DTYPE_BYTES[dtype] for n in self.unit_param_counts()]
        if quant not in QUANT_MODES:
            raise ValueError(f"unknown quantization {quant!r}")
        out = [0] * self.num_units
        tensors = {name: entry["shape"] for name, (_, entry) in self.tensor_locations.items()}
        if self.tied_embeddings and "lm_head.weight" not in tensors:
            tensors["lm_head.weight"] = [self.vocab_size, self.hidden_size]  # the head holds its own copy
        for name, shape in tensors.items():
            unit = unit_of_tensor(name, self.num_layers)
            if len(shape) != 2:
                size = 1
                for d in shape:
                    size *= d
                out[unit] += size * DTYPE_BYTES[dtype]
            elif name.startswith(("lm_head.", "model.embed_tokens.")):
                out[unit] += quantized_matrix_bytes(shape[0], shape[1], HEAD_QUANT[quant], dtype)
            else:
                out[unit] += quantized_matrix_bytes(shape[0], shape[1], quant, dtype)
        return out

    def held_weight_bytes(self, dtype: str, quant: str | None = None) -> list[int]:
        """Bytes of each unit's weights as ``Checkpoint.read_unit(unit, dtype, quant)`` returns them
        (``held_kind``: dense in ``dtype``, or formats.py blocks); a tied head counts its own copy."""
        tensors = [(name, entry["shape"], entry["dtype"]) for name, (_, entry) in self.tensor_locations.items()]
        if self.tied_embeddings and "lm_head.weight" not in self.tensor_locations:
            _, shape, stored = next(t for t in tensors if t[0] == "model.embed_tokens.weight")
            tensors.append(("lm_head.weight", shape, stored))
        out = [0] * self.num_units
        for name, shape, stored in tensors:
            kind = held_kind(name, len(shape), stored, quant)
            if kind is None:
                size = 1
                for d in shape:
                    size *= d
                out[unit_of_tensor(name, self.num_layers)] += size * DTYPE_BYTES[dtype]
            else:
                out[unit_of_tensor(name, self.num_layers)] += block_matrix_bytes(shape[0], shape[1], kind)
        return out

    def kv_bytes_per_token(self, dtype: str) -> list[int]:
        """KV cache bytes one token occupies in each unit (keys and values, blocks only)."""
        per_block = 2 * self.num_kv_heads * self.head_dim * DTYPE_BYTES[dtype]
        return [0] + [per_block] * self.num_layers + [0]

    def out_bytes_per_token(self, dtype: str) -> list[int]:
        """Bytes sent per token when the model is cut after each unit."""
        hidden = self.hidden_size * DTYPE_BYTES[dtype]
        return [hidden] * (self.num_layers + 1) + [TOKEN_ID_BYTES]


@dataclass(frozen=True)
class ListedLayout(ModelLayout):
    """A layout whose tensors are listed (a GGUF file's header, a unit cache's manifest):
    weight bytes as ``Checkpoint.read_unit`` holds them."""

    tensor_types: tuple[tuple[str, tuple[int, ...], str], ...] = ()  # (HF name, torch shape, stored type name)

    @cached_property
    def tensor_locations(self) -> dict[str, tuple[Path, dict]]:
        return {name: (self.model_dir, {"dtype": kind, "shape": list(shape)})
                for name, shape, kind in self.tensor_types}

    def unit_weight_bytes(self, dtype: str, quant: str | None = None) -> list[int]:
        """Bytes each unit's weights occupy as ``read_unit(unit, dtype, quant)`` returns them."""
        return self.held_weight_bytes(dtype, quant)
