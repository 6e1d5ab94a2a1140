"""The Llama family's rotary position embedding, computed without importing transformers.

transformers' own (``LlamaRotaryEmbedding``; Qwen2's and Mistral's are the same code)
makes the inverse frequencies once and turns each step's positions into cos and sin
tables. Importing it costs a process about 2.5 s of CPU (the config classes it needs pull
in torch.distributed), which every peer paid before its first LOAD and every source before
its first token. This module does the same arithmetic, operation for operation, for the
rope types these checkpoints use; any other type (dynamic, yarn, longrope) still comes from
transformers through ``hf.build_rotary``. tests/model/test_rotary.py checks the tables bit
for bit against the library's.
"""

from __future__ import annotations

import math

import torch

DEFAULT_THETA = 10000.0  # LlamaConfig's, Qwen2Config's and MistralConfig's default rope_theta
ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(config: dict) -> dict:
    """A config.json-style dict's rope parameters as transformers 5 reads them: its
    ``rope_parameters``, or the older ``rope_theta`` and ``rope_scaling`` folded together."""
    params = config.get("rope_parameters")
    if params is None:
        params = {**(config.get("rope_scaling") or {}), "rope_theta": config.get("rope_theta", DEFAULT_THETA)}
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", DEFAULT_THETA)
    return params


def is_ours(config: dict) -> bool:
    """Whether this module computes the config's rope type (else transformers does)."""
    return rope_parameters(config)["rope_type"] in ROPE_TYPES


def inverse_frequencies(config: dict, device: torch.device | str = "cpu") -> torch.Tensor:
    """The inverse frequencies of transformers' rope init function for the config's rope type."""
    params = rope_parameters(config)
    kind, base = params["rope_type"], params["rope_theta"]
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope type {kind!r} is not one of {ROPE_TYPES}")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    with torch.device(device):
        if kind == "default":  # the model class's own compute_default_rope_parameters
            return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
        factor = params["factor"]
        if kind == "linear":
            return inv_freq / factor
        # llama3 (Llama 3.1 and later): low frequencies scaled by factor, high ones kept, a smooth ramp between
        low_factor, high_factor = params["low_freq_factor"], params["high_freq_factor"]
        old_context = params.get("original_max_position_embeddings") or config["max_position_embeddings"]
        low_wavelen, high_wavelen = old_context / low_factor, old_context / high_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_factor) / (high_factor - low_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """``rotary(x, position_ids)`` -> (cos, sin) [B, T, head_dim] in x's dtype, as the library's forward."""

    def __init__(self, config: dict, device: torch.device | str = "cpu") -> None:
        self.inv_freq = inverse_frequencies(config, device)
        self.attention_scaling = 1.0  # these rope types scale nothing

    def __call__(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotary_embedding(config: dict, device: torch.device | str = "cpu"):
    """The rotary embedding for a config.json-style dict: ours where we compute its rope type,
    else the family's own class from transformers."""
    if is_ours(config):
        return RotaryEmbedding(config, device)
    from swarm.model import hf

    return hf.build_rotary(hf.config_from_dict(config), torch.device(device))
