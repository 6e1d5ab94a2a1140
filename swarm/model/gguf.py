"""A GGUF file as a checkpoint: read in place, one tensor at a time, blocks kept as they are.

The file is memory-mapped and its header parsed here (the ``gguf`` package's reader
decodes every vocabulary string, 4 s for SmolLM2's; this one skips them), so a
tensor's bytes are only read when ``read_unit`` asks for it. Names are llama.cpp's (``blk.N.attn_q``)
and are mapped to the Hugging Face names the rest of swarm uses. llama.cpp's
converter permutes the rows of q and k of a ``llama`` file for its rotary layout;
they are permuted back as transformers' GGUF loader does, on block rows directly
when the blocks are kept (a block never spans two rows).

What a tensor is held as follows ``units.held_kind``: unquantized, every tensor is
dequantized to float32 exactly as transformers does (the same values, bit for bit), then
cast; quantized, Q8_0/Q4_0/Q4_1 blocks are kept byte for byte, other block types
are dequantized and re-quantized (``formats.quantize``).
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from swarm.model import formats
from swarm.model.formats import QuantizedTensor, Weight
from swarm.model.units import (
    KEPT_BLOCKS, ListedLayout, UnsupportedModelError, held_kind, unit_of_tensor,
)

ARCHITECTURES = ("llama", "qwen2", "mistral")  # llama.cpp's names; a Mistral file says "llama"

_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# GGUF metadata key (after "ARCH.") -> config key, as transformers' GGUF_CONFIG_MAPPING has them.
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.dimension_count": "head_dim",  # llama and mistral only: qwen2's is not the head size
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}


def hf_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None for tensors swarm does not use."""
    if m := _BLOCK_NAME.fullmatch(gguf_name):
        part = _BLOCK.get(m[2])
        return None if part is None else f"model.layers.{m[1]}.{part}.{m[3]}"
    stem, _, suffix = gguf_name.rpartition(".")
    return f"{_TOP[stem]}.{suffix}" if stem in _TOP and suffix in ("weight", "bias") else None


class Array(NamedTuple):
    """A metadata array, by its length only (the vocabulary, the merges: nothing here reads them)."""

    count: int


@dataclass(frozen=True)
class TensorInfo:
    name: str  # llama.cpp's
    type: GGMLQuantizationType
    shape: tuple[int, ...]  # torch's order: rows first
    offset: int  # of its data, from the start of the file
    nbytes: int


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_header(buf) -> tuple[dict, list[TensorInfo]]:
    """GGUF (version 2 or 3) metadata and tensor infos from a buffer over the whole file."""
    magic, version = struct.unpack_from("<4sI", buf, 0)
    if magic != b"GGUF" or version not in (2, 3):
        raise ValueError(f"not a GGUF file of version 2 or 3 (magic {magic!r}, version {version})")
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    off = 24

    def string(off: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, off)
        return bytes(buf[off + 8:off + 8 + n]).decode("utf-8"), off + 8 + n

    def value(kind: int, off: int):
        if kind == _STRING:
            return string(off)
        if kind == _ARRAY:
            item, count = struct.unpack_from("<IQ", buf, off)
            off += 12
            if item in (_STRING, _ARRAY):
                for _ in range(count):
                    if item == _STRING:
                        off += 8 + struct.unpack_from("<Q", buf, off)[0]
                    else:
                        off = value(_ARRAY, off)[1]
            else:
                off += count * struct.calcsize(_SCALARS[item])
            return Array(count), off
        fmt = _SCALARS[kind]
        return struct.unpack_from(fmt, buf, off)[0], off + struct.calcsize(fmt)

    metadata: dict = {}
    for _ in range(n_kv):
        key, off = string(off)
        (kind,) = struct.unpack_from("<I", buf, off)
        metadata[key], off = value(kind, off + 4)
    raw = []
    for _ in range(n_tensors):
        name, off = string(off)
        (n_dims,) = struct.unpack_from("<I", buf, off)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, off + 4)
        kind, offset = struct.unpack_from("<IQ", buf, off + 4 + 8 * n_dims)
        off += 4 + 8 * n_dims + 12
        raw.append((name, GGMLQuantizationType(kind), dims, offset))
    alignment = metadata.get("general.alignment", 32)
    start = -(-off // alignment) * alignment
    tensors = []
    for name, kind, dims, offset in raw:
        block, block_bytes = GGML_QUANT_SIZES[kind]
        nbytes = int(np.prod(dims)) // block * block_bytes
        tensors.append(TensorInfo(name, kind, tuple(int(d) for d in reversed(dims)), start + offset, nbytes))
    return metadata, tensors


def tensor_data(buf, info: TensorInfo) -> np.ndarray:
    """A tensor's data in place, as the ``gguf`` package's reader gives it to ``dequantize``:
    F32 / F16 as floats in its shape, any other type as rows of bytes."""
    if info.type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        dtype = np.float32 if info.type == GGMLQuantizationType.F32 else np.float16
        return np.frombuffer(buf, dtype=dtype, count=info.nbytes // np.dtype(dtype).itemsize,
                             offset=info.offset).reshape(info.shape)
    rows = info.shape[:-1]
    return np.frombuffer(buf, dtype=np.uint8, count=info.nbytes, offset=info.offset).reshape(*rows, -1)


class GGUFLayout(ListedLayout):
    """A GGUF file's layout: sizes from its tensor infos, weight bytes as ``read_unit`` holds them."""


class GGUFFile:
    """One opened GGUF file: its metadata as a config, its tensors by Hugging Face name."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.metadata, self.infos = read_header(self._map)
        header_end = min((t.offset for t in self.infos), default=len(self._map)) // mmap.PAGESIZE * mmap.PAGESIZE
        if header_end:
            self._map.madvise(mmap.MADV_DONTNEED, 0, header_end)  # the vocabulary's pages, read once
        arch = self.metadata.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"{self.path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
        self.arch = arch
        self.tensors: dict[str, TensorInfo] = {}
        for info in self.infos:
            name = hf_name(info.name)
            if name is not None:
                self.tensors[name] = info
        self.config = self._config()

    def _value(self, key: str, default=None):
        return self.metadata.get(key, default)

    def _config(self) -> dict:
        """The config transformers derives from this metadata (``load_gguf_checkpoint``)."""
        # transformers calls a "llama" file whose general.name is exactly "mistral" a Mistral
        model_type = "mistral" if self.arch == "llama" and self._value("general.name") == "mistral" else self.arch
        config: dict = {"model_type": model_type}
        for key, config_key in _CONFIG_KEYS.items():
            if config_key == "head_dim" and model_type == "qwen2":
                continue
            value = self._value(f"{self.arch}.{key}")
            if value is not None:
                config[config_key] = value
        if "vocab_size" not in config and isinstance(self.metadata.get("tokenizer.ggml.tokens"), Array):
            config["vocab_size"] = self.metadata["tokenizer.ggml.tokens"].count
        config["tie_word_embeddings"] = all(t.name != "output.weight" for t in self.infos)
        return config

    def layout(self) -> GGUFLayout:
        c = self.config
        heads = c["num_attention_heads"]
        types = tuple((name, t.shape, t.type.name) for name, t in self.tensors.items())
        return GGUFLayout(
            model_dir=self.path, num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
            num_kv_heads=c.get("num_key_value_heads", heads), head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            vocab_size=c["vocab_size"], tied_embeddings=c["tie_word_embeddings"], checkpoint_dtype="float32",
            tensor_types=types)

    def _row_order(self, name: str, rows: int) -> torch.Tensor | None:
        """The rows that undo llama.cpp's q/k permutation (transformers' ``_reverse_permute_weights``)."""
        if self.arch != "llama" or not (".q_proj." in name or ".k_proj." in name):
            return None
        heads = self.config["num_attention_heads"]
        if ".k_proj." in name:
            heads = self.config.get("num_key_value_heads", heads)
        half = rows // heads // 2
        return torch.arange(rows).view(heads, half, 2).transpose(1, 2).reshape(rows)

    def read(self, name: str, dtype: torch.dtype, quant: str | None) -> Weight:
        """One tensor, under its Hugging Face name (a tied head is the embedding), held by ``held_kind``."""
        source = "model.embed_tokens.weight" if name == "lm_head.weight" and name not in self.tensors else name
        info = self.tensors[source]
        try:
            return self._convert(name, info, dtype, quant)
        finally:
            self._release(info)

    def _release(self, info: TensorInfo) -> None:
        """Unmap the pages a tensor was read from: what is held is a copy, and mapped pages
        count in the process's resident size, so a shard would otherwise seem to hold its
        share of the file twice. They stay in the page cache for the next reader."""
        start = info.offset // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(len(self._map), -(-(info.offset + info.nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE)
        self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def _convert(self, name: str, info: TensorInfo, dtype: torch.dtype, quant: str | None) -> Weight:
        shape, data = info.shape, tensor_data(self._map, info)
        kind = held_kind(name, len(shape), info.type.name, quant)
        order = self._row_order(name, shape[0])
        if kind is not None and KEPT_BLOCKS.get(info.type.name) == kind:
            held = _blocks(data, kind, shape)
            return held if order is None else held.rows(order)
        dense = _dequantized(data, info.type, shape)
        if order is not None:
            dense = dense[order]
        if kind is not None:
            return formats.quantize(dense, kind)
        return dense.to(dtype)


DEQUANTIZE_ROWS_VALUES = 1 << 21  # values per piece: 8 MB of float32, whatever the tensor's size


def _dequantized(data: np.ndarray, kind: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 values transformers reads (the ``gguf`` package's), a few rows at a time:
    the temporaries are several times their input's size, so a whole 8B embedding at once
    would need ~8 GB. Q8_0/Q4_0/Q4_1 blocks are expanded by ``formats`` in torch, the same
    products and sums in the same order, so the same bits, about 3x sooner than the ``gguf``
    package's numpy (a spare peer's LOAD, the one a recovery waits for, is mostly this)."""
    out = torch.empty(shape, dtype=torch.float32)
    rows = out.view(-1, shape[-1])
    data = data.reshape(rows.shape[0], -1)
    step = max(1, DEQUANTIZE_ROWS_VALUES // shape[-1])
    blocks = KEPT_BLOCKS.get(kind.name)
    for i in range(0, rows.shape[0], step):
        piece = data[i:i + step]
        if blocks is None:
            rows.numpy()[i:i + step] = dequantize(piece, kind)
        else:
            _blocks(piece, blocks, (piece.shape[0], shape[-1])).dequantize(out=rows[i:i + step])
    return out


def _blocks(data: np.ndarray, kind: str, shape: tuple[int, int]) -> QuantizedTensor:
    """A Q8_0/Q4_0/Q4_1 tensor's blocks split into formats.py's arrays (copied out of the map)."""
    n, k = shape
    raw = data.reshape(n, k // formats.BLOCK, -1)  # [N, blocks, bytes per block]

    def half(lo: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(raw[..., lo:lo + 2]).view(np.float16).reshape(n, -1))

    start = 4 if kind == "q4_1" else 2
    codes = np.ascontiguousarray(raw[..., start:]).reshape(n, -1)
    codes_t = torch.from_numpy(codes.view(np.int8) if kind == "q8_0" else codes)
    return QuantizedTensor(kind, codes_t, half(0), half(2) if kind == "q4_1" else None)


@lru_cache(maxsize=4)
def _open(path: str, size: int, mtime_ns: int) -> GGUFFile:
    return GGUFFile(Path(path))


def open_file(path: Path) -> GGUFFile:
    """The file, its header parsed once per process and its data kept memory-mapped."""
    path = Path(path).resolve()
    st = os.stat(path)
    return _open(str(path), st.st_size, st.st_mtime_ns)


def read_layout(path: Path) -> GGUFLayout:
    return open_file(path).layout()


class GGUFCheckpoint:
    """``checkpoint.Checkpoint`` over a GGUF file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = open_file(self.path)
        self.layout = self.file.layout()

    def config_dict(self) -> dict:
        return dict(self.file.config)

    def unit_tensor_names(self, unit: int) -> list[str]:
        names = [n for n in self.file.tensors if unit_of_tensor(n, self.layout.num_layers) == unit]
        if unit == self.layout.num_units - 1 and "lm_head.weight" not in names:
            names.append("lm_head.weight")  # tied: the head's weight is the embedding matrix
        return names

    def read_unit(self, unit: int, dtype: torch.dtype, quant: str | None) -> dict[str, Weight]:
        if not 0 <= unit < self.layout.num_units:
            raise ValueError(f"unit {unit} is outside [0, {self.layout.num_units})")
        return {name: self.file.read(name, dtype, quant) for name in self.unit_tensor_names(unit)}

    def fingerprint(self) -> str:
        from swarm.model.store import model_fingerprint

        return model_fingerprint(self.path)

    def tokenizer(self):
        from swarm.model import hf

        return hf.load_tokenizer(self.path)

