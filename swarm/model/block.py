"""A compact Llama-family decoder block: one function, a few dozen operator calls a step.

The library's decoder layers cost about 130 Python-level operator calls each (hooks,
kwargs plumbing, cache objects), which at 135M parameters cost as much as the matrix
products. This block does the same arithmetic, as gpt-fast writes it: fused q/k/v
and gate/up products through ``swarm.model.kernels.Linear`` (so any weight format),
rotary embedding, attention over the shard's preallocated KV cache, and the MLP.
In float32 it is the library's arithmetic operation for operation (same RMSNorm,
same rotary, the same sdpa call the library makes for each case), so shards stay
token-identical to transformers (tests/model/test_block.py, for Llama, Qwen2, Mistral).

Weights arrive as a dict of the checkpoint's own (Hugging Face) names for one block,
each dense or a ``QuantizedTensor``: whatever ``Checkpoint.read_unit`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from swarm.model import kernels
from swarm.model.formats import QuantizedTensor, Weight
from swarm.model.kernels import Linear
from swarm.model.kernels.native import BlockDecoder


# Steps of at most this many new tokens a row, after cached ones, run as native one-token rows
# (``SlotKVCache.decode_target``): a verify step of up to 15 drafts, a short chat turn.
NATIVE_MAX_WIDTH = 16
DEFAULT_RMS_NORM_EPS = 1e-6  # LlamaConfig's, Qwen2Config's and MistralConfig's default


@dataclass(frozen=True)
class BlockShape:
    """What a block's arithmetic needs from the model config."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float

    @classmethod
    def from_config(cls, config: dict) -> "BlockShape":
        """From a config.json-style dict (``Checkpoint.config_dict()``), with the library's defaults."""
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        return cls(heads, config.get("num_key_value_heads") or heads, head_dim,
                   config.get("rms_norm_eps", DEFAULT_RMS_NORM_EPS))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm, operation for operation (its casts skipped where x is float32 already: no-ops)."""
    dtype = x.dtype
    h = x if dtype == torch.float32 else x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (h if dtype == torch.float32 else h.to(dtype))


class Rope(NamedTuple):
    """One step's rotary tables, made once for all blocks (``rope``): [B, 1, T, D] each."""

    cos: torch.Tensor
    sin: torch.Tensor  # the first half negated: see rotate


def rope(cos: torch.Tensor, sin: torch.Tensor) -> Rope:
    """The tables ``rotate`` takes, from the rotary embedding's cos and sin [B, T, D]."""
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return Rope(cos.unsqueeze(1), signed.unsqueeze(1))


def rotate(x: torch.Tensor, tables: Rope) -> torch.Tensor:
    """apply_rotary_pos_emb for one tensor [B, heads, T, D], bit for bit.

    The library computes x * cos + cat(-x2, x1) * sin. cat(-x2, x1) is x rolled by half
    with its first half negated, and (-a) * b is -(a * b) exactly, so the negation moves
    onto sin once a step: four operator calls a tensor instead of seven.
    """
    return (x * tables.cos) + (x.roll(x.shape[-1] // 2, -1) * tables.sin)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The sdpa call transformers makes for each case (so float32 results are the library's, bit for bit).

    q [B, H, T, D]; k, v [B, KV, S, D]; mask bool [B, 1, T, S] or None (plain causal). Returns [B, T, H * D].
    """
    batch, heads, width, dim = q.shape
    groups = heads // k.shape[1]
    kwargs = {}
    if groups > 1:
        if mask is None and dim <= 256:
            kwargs["enable_gqa"] = True
        elif width == 1:  # one query token: the group's heads become its query rows
            q = q.reshape(batch, heads // groups, groups, dim)
        else:
            k = k[:, :, None].expand(batch, k.shape[1], groups, *k.shape[2:]).reshape(batch, heads, -1, dim)
            v = v[:, :, None].expand(batch, v.shape[1], groups, *v.shape[2:]).reshape(batch, heads, -1, dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                         is_causal=width > 1 and mask is None, **kwargs)
    if out.shape[1] != heads:  # the group's heads were query rows: [B, KV, groups, D] -> [B, H, 1, D]
        out = out.reshape(batch, heads, width, dim)
    return out.transpose(1, 2).reshape(batch, width, heads * dim)


class Projections(torch.nn.Module):
    """Several linears of one input (q/k/v, gate/up), held as one fused weight where they share a format.

    Our kernels compute each output row on its own, so a fused product is the parts' products
    side by side, and quantized, bfloat16 and float32 decode products run fused. A float32
    product of more rows (a prefill) goes to the BLAS, which picks its kernel by shape: a fused
    product would differ in the last bits from the library's separate ones, so there each part
    is computed alone, on its rows of the fused weight (a view: no copy). float16 weights and a
    GGUF file's parts of different formats (Q4_K_M keeps v at 6 bits) stay separate.
    """

    def __init__(self, weights: list[Weight], biases: list[torch.Tensor | None]):
        super().__init__()
        kinds = {w.kind if isinstance(w, QuantizedTensor) else w.dtype for w in weights}
        self.sizes = [w.shape[0] for w in weights]
        self.fused = len(kinds) == 1 and next(iter(kinds)) != torch.float16
        if self.fused:
            self.parts = torch.nn.ModuleList([Linear.fuse(weights, biases)])
        else:
            self.parts = torch.nn.ModuleList([Linear(w, b) for w, b in zip(weights, biases)])
        self.views: list[Linear] | None = None  # float32: the parts as views of the fused weight
        whole = self.parts[0]
        if self.fused and whole.kind == "float32":
            bias = whole.bias.split(self.sizes) if whole.bias is not None else [None] * len(self.sizes)
            self.views = [Linear(w, b) for w, b in zip(whole.dense.split(self.sizes), bias)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.views is not None and not self.parts[0].takes_native(x):
            return tuple(part(x) for part in self.views)  # the BLAS's product, part by part
        if self.fused:
            return self.parts[0](x).split(self.sizes, dim=-1)
        return tuple(part(x) for part in self.parts)


class Block(torch.nn.Module):
    """Decoder block ``index`` (0-based) of a Llama / Qwen2 / Mistral model."""

    def __init__(self, index: int, shape: BlockShape, weights: dict[str, Weight]):
        super().__init__()
        self.index, self.shape = index, shape
        p = f"model.layers.{index}."
        w = weights.get
        self.input_norm = torch.nn.Parameter(weights[p + "input_layernorm.weight"], requires_grad=False)
        self.post_norm = torch.nn.Parameter(weights[p + "post_attention_layernorm.weight"], requires_grad=False)
        attn, mlp = p + "self_attn.", p + "mlp."
        self.qkv = Projections([weights[attn + f"{n}_proj.weight"] for n in "qkv"],
                               [w(attn + f"{n}_proj.bias") for n in "qkv"])
        self.o = Linear(weights[attn + "o_proj.weight"], w(attn + "o_proj.bias"))
        self.gate_up = Projections([weights[mlp + "gate_proj.weight"], weights[mlp + "up_proj.weight"]],
                                   [w(mlp + "gate_proj.bias"), w(mlp + "up_proj.bias")])
        self.down = Linear(weights[mlp + "down_proj.weight"], w(mlp + "down_proj.bias"))
        self.scale = shape.head_dim ** -0.5
        self.decoder = self._native_decoder()

    def _native_decoder(self):
        """The native kernels' one-call decode block (native.c's swarm_block_decode) where every product is
        fused and quantized, bfloat16 or float32 and the norms (and biases) are float32 or bfloat16 (float32
        with float32 weights); None otherwise."""
        linears = [self.qkv.parts[0], self.o, self.gate_up.parts[0], self.down]
        if not (self.qkv.fused and self.gate_up.fused):
            return None
        kinds = {lin.kind for lin in linears}
        if not (all(lin.quantized for lin in linears) or kinds == {"bfloat16"} or kinds == {"float32"}):
            return None
        if kinds == {"float32"} and self.input_norm.dtype != torch.float32:
            return None
        tensors = [self.input_norm, self.post_norm] + [lin.bias for lin in linears if lin.bias is not None]
        dtype = self.input_norm.dtype
        if dtype not in (torch.float32, torch.bfloat16) or any(t.dtype != dtype or t.device.type != "cpu"
                                                               or not t.is_contiguous() for t in tensors):
            return None
        lib = kernels._native()
        if lib is None:
            return None
        s = self.shape
        return BlockDecoder(lib, linears, self.input_norm.data, self.post_norm.data, s.num_heads, s.num_kv_heads,
                            s.head_dim, s.rms_norm_eps, self.scale)

    @staticmethod
    def tensor_names(index: int) -> list[str]:
        """Checkpoint names a block reads (biases are optional: Qwen2 has q/k/v biases)."""
        p = f"model.layers.{index}."
        return [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                *[p + f"self_attn.{n}_proj.weight" for n in "qkvo"],
                *[p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]]

    def forward(self, x: torch.Tensor, tables: Rope, cache, mask: torch.Tensor | None):
        """x [B, T, hidden] -> [B, T, hidden]; ``cache.update`` stores this step's keys and values.

        ``tables``: ``rope(cos, sin)`` of the step's rotary embedding, made once for all blocks.
        """
        s = self.shape
        batch, width, _ = x.shape
        if (self.decoder is not None and width <= NATIVE_MAX_WIDTH and x.device.type == "cpu"
                and x.dtype == self.decoder.dtype == tables.cos.dtype
                and tables.cos.is_contiguous() and tables.sin.is_contiguous()):
            # a narrow step (the cache says which): one native call, every new token a row of its own that
            # attends to its own positions, as the causal mask of rows of different lengths says
            target = cache.decode_target(self.index, x.dtype)
            if target is not None:
                return self.decoder(x, tables.cos, tables.sin, target)
        heads, kv, dim = s.num_heads, s.num_kv_heads, s.head_dim
        h = rms_norm(x, self.input_norm, s.rms_norm_eps)
        if self.qkv.fused and self.qkv.views is None:
            # one product [B, T, (H + 2 KV) D]: q and k rotate as one tensor of H + KV heads
            qkv = self.qkv.parts[0](h).view(batch, width, heads + 2 * kv, dim).transpose(1, 2)
            qk = rotate(qkv.narrow(1, 0, heads + kv), tables)
            q, k, v = qk.narrow(1, 0, heads), qk.narrow(1, heads, kv), qkv.narrow(1, heads + kv, kv)
        else:
            q, k, v = self.qkv(h)
            q = rotate(q.view(batch, width, heads, dim).transpose(1, 2), tables)
            k = rotate(k.view(batch, width, kv, dim).transpose(1, 2), tables)
            v = v.view(batch, width, kv, dim).transpose(1, 2)
        keys, values = cache.update(k, v, self.index)
        x = x + self.o(attend(q, keys, values, mask, self.scale).contiguous())
        gate, up = self.gate_up(rms_norm(x, self.post_norm, s.rms_norm_eps))
        return x + self.down(F.silu(gate) * up)
