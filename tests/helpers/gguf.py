"""Tiny GGUF files written with the gguf package's writer from a tiny random model, named
and q/k-permuted as llama.cpp's convert_hf_to_gguf does (shared by the GGUF, unit-file and
transfer tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFWriter, MODEL_ARCH, get_tensor_name_map, quants
from safetensors.torch import load_file

ARCH = {"llama": MODEL_ARCH.LLAMA, "qwen2": MODEL_ARCH.QWEN2}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: HF rows -> llama.cpp's rotary layout."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def k_quant_blocks(rows: int, cols: int, qtype: str, seed: int) -> np.ndarray:
    """Random Q4_K / Q6_K blocks with sane float16 scales (numpy cannot quantize K-quants)."""
    block_bytes = {"Q4_K": 144, "Q6_K": 210}[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // 256, block_bytes), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, size=(rows, cols // 256, 2)).astype(np.float16).view(np.uint8)
    if qtype == "Q4_K":
        raw[..., 0:4] = scales.reshape(rows, cols // 256, 4)  # d and dmin
    else:
        raw[..., 208:210] = scales[..., :2]  # d
    return raw.reshape(rows, -1)


def write_gguf(model_dir: Path, out: Path, qtype: str, tied: bool = False, arch: str = "llama",
               name: str = "tiny") -> Path:
    """``qtype`` "K" mixes K-quants: Q6_K for the embedding and ffn_down, Q4_K for the other matrices."""
    config = json.loads((model_dir / "config.json").read_text())
    heads, kv_heads, layers = config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]
    writer = GGUFWriter(out, arch)
    writer.add_name(name)
    writer.add_block_count(layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_vocab_size(config["vocab_size"])
    names = get_tensor_name_map(ARCH[arch], layers)
    for i, (name, tensor) in enumerate(load_file(model_dir / "model.safetensors").items()):
        if tied and name == "lm_head.weight":
            continue
        stem, suffix = name.rsplit(".", 1)
        data = tensor.numpy()
        if arch == "llama" and ".q_proj." in name:
            data = _permute(data, heads)
        elif arch == "llama" and ".k_proj." in name:
            data = _permute(data, kv_heads)
        gguf_name = f"{names.get_name(stem)}.{suffix}"
        if data.ndim == 1 or qtype == "F32":
            writer.add_tensor(gguf_name, data.astype(np.float32))
        elif qtype == "F16":
            writer.add_tensor(gguf_name, data.astype(np.float16))
        elif qtype == "K":
            kind = "Q6_K" if "embed_tokens" in name or "down_proj" in name else "Q4_K"
            writer.add_tensor(gguf_name, k_quant_blocks(*data.shape, kind, i), raw_dtype=T[kind])
        else:
            writer.add_tensor(gguf_name, quants.quantize(data, T[qtype]), raw_dtype=T[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
