"""Weight-only quantization and fused projections for a shard's modules.

Decode on a CPU is bound by reading the weights: every new token streams every
weight matrix from memory once. Two module transforms cut that work while the
library's own decoder layers keep running unchanged around them:

- ``fuse_projections``: q/k/v (and gate/up) read the same input, so one matmul
  over their concatenated weights replaces three (two). Float32 results are
  bitwise the same as the separate matmuls (each output is the same dot product),
  so the shard stays token-identical to transformers.
- ``quantize_layer`` / ``quantize_embedding`` / ``quantize_head``: int8 weights
  with one scale per output channel, or int4 weights in groups of ``INT4_GROUP``
  with a scale and an offset per group, on torch's own CPU kernels
  (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``). Those kernels are
  fast only with bfloat16 activations (10-20x slower with float32 ones), so a
  quantized linear computes in bfloat16 and hands back the dtype it was given.

Byte counts for every layout live in ``swarm.model.units`` (torch-free, for the
planner); ``tests/model/test_quant.py`` checks they equal what the modules hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from swarm.model.units import HEAD_QUANT, INT4_GROUP, QUANT_MODES, int4_fits

COMPUTE_DTYPE = torch.bfloat16  # what the quantized kernels multiply in


def check_quant(quant: str | None) -> str | None:
    """``None`` / "none" -> None; "int8" / "int4" as they are; anything else is an error."""
    if quant in (None, "none", ""):
        return None
    if quant not in QUANT_MODES:
        raise ValueError(f"unknown quantization {quant!r} (choose from none, {', '.join(QUANT_MODES)})")
    return quant


# --------------------------------------------------------------- int8, per row
def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (int8 [N, K], bfloat16 scales [N]); row n is about q[n] * scales[n]."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10).to(COMPUTE_DTYPE)
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8_rows(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[:, None]


class Int8Linear(nn.Module):
    """y = x W^T + b with W held as int8 rows and one bfloat16 scale per output channel."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)  # int8 [N, K]
        self.register_buffer("scales", scales)  # bfloat16 [N]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(*quantize_int8_rows(linear.weight.data), _bias(linear))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scales)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_int8_rows(self.qweight, self.scales)


# ------------------------------------------------------------- int4, per group
def quantize_int4_groups(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (int32 codes 0..15 [N, K], bfloat16 scales_and_zeros [K / group, N, 2]).

    Asymmetric groups along K: w = (code - 8) * scale + zero, the layout torch's
    int4 kernel reads (zero is the group's value at code 8).
    """
    n, k = weight.shape
    w = weight.float().view(n, k // group, group)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-10).to(COMPUTE_DTYPE)
    zero = (low + 8 * scale.float()).to(COMPUTE_DTYPE)
    codes = torch.round((w - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return codes.to(torch.int32).view(n, k), scales_and_zeros


def dequantize_int4_groups(codes: torch.Tensor, scales_and_zeros: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    n, k = codes.shape
    sz = scales_and_zeros.float().transpose(0, 1)  # [N, K / group, 2]
    w = (codes.float().view(n, k // group, group) - 8) * sz[..., 0:1] + sz[..., 1:2]
    return w.view(n, k)


class Int4Linear(nn.Module):
    """y = x W^T + b with W held as packed int4 codes, a scale and a zero per group of K."""

    def __init__(self, codes: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None,
                 group: int = INT4_GROUP):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group = group
        # uint8 [N, K / 2]: rows stay independent, so the packed weight is one buffer per row range
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # bfloat16 [K / group, N, 2]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: int = INT4_GROUP) -> "Int4Linear":
        return cls(*quantize_int4_groups(linear.weight.data, group), _bias(linear), group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scales_and_zeros)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int8Embedding(nn.Module):
    """Token embedding held as int8 rows with a bfloat16 scale per token (the int8 head's layout)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("qweight", qweight)  # int8 [V, H]
        self.register_buffer("scales", scales)  # bfloat16 [V]
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.qweight).to(self.dtype)
        return rows * self.scales[ids].to(self.dtype)[..., None]


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.data


def quantize_linear(linear: nn.Linear, quant: str) -> nn.Module:
    """The quantized form of one linear layer; int4 falls back to int8 where the kernel's shapes do not fit."""
    n, k = linear.weight.shape
    if quant == "int4" and int4_fits(n, k):
        return Int4Linear.from_linear(linear)
    return Int8Linear.from_linear(linear)


# ------------------------------------------------------------ fused projections
class FusedProjection(nn.Module):
    """Several projections of one input as one matmul; ``ProjectionPart`` modules hand out the pieces.

    The library's layer calls q_proj(x), k_proj(x), v_proj(x) in turn with the same
    tensor: the first call computes all of them, the others take their slice. A
    part called with any other input computes the product itself, so the result
    never depends on the call order, only the speed does.
    """

    def __init__(self, linear: nn.Module, sizes: list[int]):
        super().__init__()
        self.linear, self.sizes = linear, sizes
        self._input: torch.Tensor | None = None
        self._parts: tuple[torch.Tensor, ...] = ()
        self._taken: set[int] = set()

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if x is not self._input or index in self._taken:
            self._input, self._taken = x, set()
            self._parts = self.linear(x).split(self.sizes, dim=-1)
        out = self._parts[index]
        self._taken.add(index)
        if len(self._taken) == len(self.sizes):  # every part handed out: hold no activations between steps
            self._input, self._parts, self._taken = None, (), set()
        return out


class ProjectionPart(nn.Module):
    def __init__(self, fused: FusedProjection, index: int):
        super().__init__()
        self.fused, self.index = fused, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(x, self.index)


FUSED_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


def fuse_projections(layer: nn.Module) -> None:
    """Fuse a Llama-family decoder layer's q/k/v and gate/up linears in place."""
    for owner_name, names in FUSED_GROUPS:
        owner = getattr(layer, owner_name, None)
        linears = [getattr(owner, n, None) for n in names]
        if owner is None or not all(type(m) is nn.Linear for m in linears):
            continue
        has_bias = [m.bias is not None for m in linears]
        if any(has_bias) and not all(has_bias):
            continue
        weight = torch.cat([m.weight.data for m in linears])
        fused_linear = nn.Linear(weight.shape[1], weight.shape[0], bias=all(has_bias), device="meta")
        fused_linear.weight = nn.Parameter(weight, requires_grad=False)
        if all(has_bias):
            fused_linear.bias = nn.Parameter(torch.cat([m.bias.data for m in linears]), requires_grad=False)
        fused = FusedProjection(fused_linear, [m.out_features for m in linears])
        for i, name in enumerate(names):
            setattr(owner, name, ProjectionPart(fused, i))


def quantize_layer(layer: nn.Module, quant: str) -> None:
    """Replace every linear of a decoder layer (fused or not) by its quantized form, in place."""
    for name, module in list(layer.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, quantize_linear(child, quant))


def quantize_embedding(embed: nn.Embedding, dtype: torch.dtype) -> Int8Embedding:
    return Int8Embedding(*quantize_int8_rows(embed.weight.data), dtype)


def quantize_head(head: nn.Linear, quant: str, embedding: Int8Embedding | None = None) -> nn.Module:
    """The quantized output head; an int8 head tied to an int8 embedding in this shard shares its buffers."""
    if HEAD_QUANT[quant] == "int8" and embedding is not None:
        return Int8Linear(embedding.qweight, embedding.scales, _bias(head))
    return quantize_linear(head, HEAD_QUANT[quant])
