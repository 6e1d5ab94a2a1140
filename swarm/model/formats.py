"""The weight formats a shard holds, sends and computes in: dense tensors and GGUF-style blocks.

A quantized matrix [N, K] is cut into blocks of ``BLOCK`` = 32 weights along K
(the input dimension), each with its own float16 scale, exactly as llama.cpp's
GGUF files hold them, so a Q4_0 / Q4_1 / Q8_0 file is held and sent as it is:

| kind | codes | per block | weight |
|---|---|---|---|
| ``q8_0`` | int8 [N, K] | scale d | d * q |
| ``q4_0`` | uint8 [N, K/2], two codes a byte | scale d | d * (q - 8) |
| ``q4_1`` | uint8 [N, K/2], two codes a byte | scale d, min m | d * q + m |

The layout is GGUF's, split into arrays ("structure of arrays"): ``codes`` holds
each block's ``qs`` bytes, blocks in order along the row, and ``scales`` (and
``mins``) float16 [N, K/32]. Within a 4-bit block, byte j holds weight j in its
low nibble and weight j + 16 in its high nibble (GGUF's order). Rows are
independent, so a row permutation (GGUF's q/k rotary layout) needs no decoding.

``quantize`` follows llama.cpp's reference quantizers (``quantize_row_*_ref``) and
``dequantize`` is the exact inverse mapping: these are the numerics every faster
kernel is tested against (``swarm.model.kernels``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32
QUANT_KINDS = ("q8_0", "q4_0", "q4_1")


@dataclass(frozen=True)
class QuantizedTensor:
    """A [N, K] weight matrix in blocks of 32 along K (see the module docstring)."""

    kind: str
    codes: torch.Tensor  # int8 [N, K] (q8_0) or uint8 [N, K / 2] (q4_*)
    scales: torch.Tensor  # float16 [N, K / 32]
    mins: torch.Tensor | None = None  # float16 [N, K / 32], q4_1 only

    def __post_init__(self) -> None:
        if self.kind not in QUANT_KINDS:
            raise ValueError(f"unknown quantized kind {self.kind!r} (known: {', '.join(QUANT_KINDS)})")
        n, blocks = self.scales.shape
        want = (n, blocks * BLOCK) if self.kind == "q8_0" else (n, blocks * BLOCK // 2)
        if tuple(self.codes.shape) != want:
            raise ValueError(f"{self.kind}: codes {tuple(self.codes.shape)} do not match scales {tuple(self.scales.shape)}")
        if (self.mins is not None) != (self.kind == "q4_1"):
            raise ValueError(f"{self.kind}: mins are {'missing' if self.mins is None else 'unexpected'}")

    @property
    def shape(self) -> tuple[int, int]:
        n, blocks = self.scales.shape
        return n, blocks * BLOCK

    @property
    def nbytes(self) -> int:
        parts = [self.codes, self.scales] + ([self.mins] if self.mins is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The arrays by suffix, as a unit file stores them (``NAME.codes``, ``NAME.scales``, ``NAME.mins``)."""
        out = {"codes": self.codes, "scales": self.scales}
        if self.mins is not None:
            out["mins"] = self.mins
        return out

    def rows(self, index: torch.Tensor) -> "QuantizedTensor":
        """The rows ``index`` (an embedding lookup, a row permutation), still quantized."""
        mins = None if self.mins is None else self.mins[index]
        return QuantizedTensor(self.kind, self.codes[index], self.scales[index], mins)

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 values (cast to ``dtype``): the ``gguf`` package's, bit for bit. With
        ``out`` (float32 [N, K]) they are written there, with no temporary the size of the result."""
        n, k = self.shape
        if out is None:
            out = torch.empty(n, k, dtype=torch.float32)
        blocks = out.view(n, k // BLOCK, BLOCK)
        scales = self.scales.float()[..., None]  # [N, K/32, 1]
        if self.kind == "q8_0":
            torch.mul(self.codes.view(n, k // BLOCK, BLOCK), scales, out=blocks)
        else:  # a block's first 16 values are its bytes' low nibbles, its last 16 the high ones
            packed = self.codes.view(n, k // BLOCK, BLOCK // 2)
            for half, codes in ((blocks[..., :BLOCK // 2], packed & 0x0F), (blocks[..., BLOCK // 2:], packed >> 4)):
                if self.kind == "q4_0":
                    half.copy_(codes).sub_(8).mul_(scales)
                else:
                    torch.mul(codes, scales, out=half)
            if self.kind == "q4_1":
                blocks.add_(self.mins.float()[..., None])
        return out.to(dtype)


def unpack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] in GGUF's block order -> uint8 codes 0..15 [N, K]."""
    n = codes.shape[0]
    b = codes.view(n, -1, BLOCK // 2)
    return torch.cat([b & 0x0F, b >> 4], dim=-1).reshape(n, -1)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [N, K] -> uint8 [N, K/2] in GGUF's block order."""
    n = q.shape[0]
    b = q.to(torch.uint8).view(n, -1, BLOCK)
    return (b[..., : BLOCK // 2] | (b[..., BLOCK // 2:] << 4)).reshape(n, -1)


QUANTIZE_ROWS = 4096  # rows quantized at a time: the float32 temporaries stay small beside a 128k-row embedding


def quantize(weight: torch.Tensor, kind: str) -> QuantizedTensor:
    """float [N, K] (K a multiple of 32) -> blocks, as llama.cpp's reference quantizers compute them."""
    n, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"{kind} needs K divisible by {BLOCK}, got {k}")
    if kind not in QUANT_KINDS:
        raise ValueError(f"unknown quantized kind {kind!r} (known: {', '.join(QUANT_KINDS)})")
    if n <= QUANTIZE_ROWS:
        return _quantize_rows(weight.float(), kind)
    parts = [_quantize_rows(weight[i:i + QUANTIZE_ROWS].float(), kind) for i in range(0, n, QUANTIZE_ROWS)]
    mins = None if kind != "q4_1" else torch.cat([p.mins for p in parts])
    return QuantizedTensor(kind, torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), mins)


def _quantize_rows(weight: torch.Tensor, kind: str) -> QuantizedTensor:
    n, k = weight.shape
    w = weight.contiguous().view(n, k // BLOCK, BLOCK)
    if kind == "q8_0":
        d = w.abs().amax(dim=-1) / 127
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        q = torch.round(w * inv[..., None]).to(torch.int8)
        return QuantizedTensor(kind, q.view(n, k), d.half())
    if kind == "q4_0":
        # the signed value of largest magnitude maps to code 0 (d = max / -8)
        at = w.abs().argmax(dim=-1, keepdim=True)
        d = (torch.gather(w, -1, at) / -8).squeeze(-1)
        inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
        q = torch.clamp(torch.floor(w * inv[..., None] + 8.5), 0, 15)
        return QuantizedTensor(kind, pack_nibbles(q.view(n, k)), d.half())
    if kind == "q4_1":
        low, high = w.amin(dim=-1), w.amax(dim=-1)
        d = (high - low) / 15
        inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
        q = torch.clamp(torch.floor((w - low[..., None]) * inv[..., None] + 0.5), 0, 15)
        return QuantizedTensor(kind, pack_nibbles(q.view(n, k)), d.half(), low.half())
    raise AssertionError(kind)


Weight = torch.Tensor | QuantizedTensor  # what a unit file holds for one checkpoint tensor
