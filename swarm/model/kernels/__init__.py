"""Matrix products y = x @ W.T (+ b) for the weight formats of ``swarm.model.formats``.

``Linear(weight, bias)`` holds a dense float tensor or a ``QuantizedTensor`` and
computes in x's dtype (float32 or bfloat16). Float32 dense weights of a prefill go through
``torch.nn.functional.linear`` unchanged (the library's own call).
Quantized weights are computed without ever holding a dequantized copy, with x rounded
to int8 blocks of 32 first (``quantize_activations``), as llama.cpp does: the compiled
kernels (``swarm.model.kernels.native``, built with the system's C compiler at first
use) then sum each block's products exactly in integers. Where no compiler works, or
with ``SWARM_KERNELS=torch``, a torch path computes the same rounding by dequantizing
row chunks on the fly. bfloat16 and float32 decode products (a few rows of x) use the native
kernels too: torch's bfloat16 product reads its weights at half the memory bandwidth, MKL's
one-token float32 product the small matrices of a 135M model at about 80% of it. The native
float32 sums are in another order than the BLAS's (float32 rounding apart, not bit for bit);
products of more rows (a prefill) stay the BLAS's, the library's own calls.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from swarm.model.formats import BLOCK, QuantizedTensor, Weight

# Bumped when the numbers a kernel computes change: profiles measured under another version are not reused.
VERSION = "6"
NATIVE_MAX_ROWS = 8  # bfloat16 and float32 products with at most this many rows of x use the native kernels (decode)

CHUNK_ROWS = 2048  # rows dequantized at a time on the torch path (bounds the temporary)


def use_native() -> bool:
    return os.environ.get("SWARM_KERNELS", "").lower() != "torch"


def _native():
    if not use_native():
        return None
    from swarm.model.kernels import native

    return native.library()


def kernel_id() -> str:
    """Which kernels this process computes with, e.g. "5-avx512", "5-avx2" or "5-torch": the key profiles
    are cached under."""
    lib = _native()
    return f"{VERSION}-{lib.simd.replace(' ', '-') if lib is not None else 'torch'}"


def round_to_blocks(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] rounded to int8 blocks of 32 (scale amax / 127, to nearest even), returned dequantized."""
    blocks = x.float().reshape(x.shape[0], -1, BLOCK)
    scale = blocks.abs().amax(-1, keepdim=True) / 127.0
    inverse = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    return (torch.round(blocks * inverse) * scale).reshape(x.shape)


def quantize_activations(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x [M, K] as the kernels take it for a weight of ``kind``, returned dequantized: rounded to int8 blocks
    of 32, as llama.cpp does, so each block's dot product is an exact integer sum in the native kernels.

    For q8_0 weights the kernels also take what that rounding left out, rounded to int8 blocks of its
    own, and sum the two products (native.c's swarm_matmul_quant: x's rounding would otherwise cost more
    perplexity than the weights' own); the sum is returned here.
    """
    xq = round_to_blocks(x)
    if kind != "q8_0":
        return xq
    return xq + round_to_blocks(x.float() - xq)


def matmul_torch(x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W.T with the native kernels' rounding of x, dequantizing CHUNK_ROWS rows of W at a time."""
    n, _ = weight.shape
    xq = quantize_activations(x, weight.kind)
    out = torch.empty(x.shape[0], n, dtype=torch.float32)
    for start in range(0, n, CHUNK_ROWS):
        part = _slice(weight, start, min(n, start + CHUNK_ROWS))
        out[:, start:start + part.shape[0]] = xq @ part.dequantize(torch.float32).T
    if bias is not None:
        out += bias.to(torch.float32)
    return out.to(x.dtype)


def _slice(weight: QuantizedTensor, start: int, stop: int) -> QuantizedTensor:
    mins = None if weight.mins is None else weight.mins[start:stop]
    return QuantizedTensor(weight.kind, weight.codes[start:stop], weight.scales[start:stop], mins)


def _cat(weights: list[Weight]) -> Weight:
    if all(isinstance(w, torch.Tensor) for w in weights):
        if len({w.dtype for w in weights}) != 1:
            raise ValueError("fuse: dense weights of different dtypes")
        return torch.cat(weights, dim=0)
    kinds = {w.kind if isinstance(w, QuantizedTensor) else None for w in weights}
    if len(kinds) != 1:
        raise ValueError(f"fuse: weights of different kinds {sorted(map(str, kinds))}")
    mins = None if weights[0].mins is None else torch.cat([w.mins for w in weights])
    return QuantizedTensor(weights[0].kind, torch.cat([w.codes for w in weights]),
                           torch.cat([w.scales for w in weights]), mins)


class Linear(nn.Module):
    """y = x @ W.T + b for W dense (float32/bfloat16/float16) or a QuantizedTensor."""

    def __init__(self, weight: Weight, bias: torch.Tensor | None = None):
        super().__init__()
        self.quantized = isinstance(weight, QuantizedTensor)
        if self.quantized:
            self.kind = weight.kind
            self.register_buffer("codes", weight.codes.contiguous(), persistent=False)
            self.register_buffer("scales", weight.scales.contiguous(), persistent=False)
            self.register_buffer("mins", None if weight.mins is None else weight.mins.contiguous(), persistent=False)
        else:
            self.kind = str(weight.dtype).removeprefix("torch.")
            self.register_buffer("dense", weight.contiguous(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.contiguous(), persistent=False)
        self.out_features, self.in_features = weight.shape

    @classmethod
    def fuse(cls, weights: list[Weight], biases: list[torch.Tensor | None] | None = None) -> "Linear":
        """One Linear whose output is the concatenation of each weight's (q/k/v, gate/up)."""
        bias = None
        if biases is not None and any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else torch.zeros(w.shape[0], dtype=next(
                bb for bb in biases if bb is not None).dtype) for w, b in zip(weights, biases)])
        return cls(_cat(list(weights)), bias)

    @property
    def weight(self) -> Weight:
        if self.quantized:
            return QuantizedTensor(self.kind, self.codes, self.scales, self.mins)
        return self.dense

    @property
    def weight_bytes(self) -> int:
        w = self.weight
        return w.nbytes if self.quantized else w.numel() * w.element_size()

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.kind}, bias={self.bias is not None}"

    def takes_native(self, x: torch.Tensor) -> bool:
        """Whether a dense weight's product with x runs on the native kernels (a bfloat16 or float32 decode:
        at most NATIVE_MAX_ROWS rows of x, on a CPU, where the kernels are built); else torch's."""
        w = self.dense
        return (w.dtype in (torch.bfloat16, torch.float32) and x.numel() <= NATIVE_MAX_ROWS * self.in_features
                and w.device.type == "cpu" and x.device.type == "cpu"
                and (w.dtype == torch.bfloat16 or x.dtype == torch.float32) and _native() is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., K] -> [..., N]. The native kernels take x's leading dimensions as rows (no reshapes:
        # at 135M a decode step makes 120 of these calls, and each operator call costs microseconds).
        if not self.quantized:
            w = self.dense
            if self.takes_native(x):
                lib = _native()
                y = lib.matmul_bf16(x, w) if w.dtype == torch.bfloat16 else lib.matmul_f32(x, w)
                return y if self.bias is None else y + self.bias.to(y.dtype)
            if w.dtype != x.dtype:
                w = w.to(x.dtype)  # float16 weights with float32 x: a temporary, rare
            # [..., K] as the library's nn.Linear calls it (the same BLAS call for float32)
            return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        lib = _native()
        if lib is not None:
            return lib.matmul_parts(x, self.kind, self.codes, self.scales, self.mins, self.bias)
        shape = x.shape
        y = matmul_torch(x.reshape(-1, shape[-1]), self.weight, self.bias)
        return y.reshape(*shape[:-1], self.out_features)


def embedding(weight: Weight, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows ``ids`` of ``weight`` (dense or quantized; quantized rows come out in ``dtype``, default float32)."""
    if isinstance(weight, QuantizedTensor):
        flat = ids.reshape(-1)
        rows = weight.rows(flat).dequantize(dtype or torch.float32)
        return rows.reshape(*ids.shape, weight.shape[1])
    out = F.embedding(ids, weight)
    return out if dtype is None else out.to(dtype)


__all__ = ["Linear", "embedding", "VERSION", "BLOCK", "kernel_id", "matmul_torch", "use_native"]
