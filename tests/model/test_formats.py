"""formats.py's blocks are byte-exact with the gguf package's (llama.cpp's) quantizers."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T, quants

from swarm.model.formats import QUANT_KINDS, QuantizedTensor, quantize

N, K = 48, 128


def _split(raw: np.ndarray, kind: str):
    blocks = raw.reshape(N, K // 32, -1)
    half = lambda a: torch.from_numpy(a.copy().view(np.float16)).squeeze(-1)
    if kind == "q8_0":
        return half(blocks[..., :2]), None, torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(N, -1)
    if kind == "q4_0":
        return half(blocks[..., :2]), None, torch.from_numpy(blocks[..., 2:].copy()).reshape(N, -1)
    return half(blocks[..., :2]), half(blocks[..., 2:4]), torch.from_numpy(blocks[..., 4:].copy()).reshape(N, -1)


@pytest.mark.parametrize("kind,gtype", [("q8_0", T.Q8_0), ("q4_0", T.Q4_0), ("q4_1", T.Q4_1)])
def test_blocks_match_gguf(kind, gtype):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0))
    raw = quants.quantize(w.numpy(), gtype)
    ours = quantize(w, kind)
    scales, mins, codes = _split(raw, kind)
    assert torch.equal(ours.codes, codes) and torch.equal(ours.scales, scales)
    if mins is not None:
        assert torch.equal(ours.mins, mins)
    assert torch.equal(ours.dequantize(), torch.from_numpy(quants.dequantize(raw, gtype)))
    assert ours.nbytes == raw.nbytes
    assert isinstance(ours.rows(torch.tensor([2, 0])), QuantizedTensor)


@pytest.mark.parametrize("kind", QUANT_KINDS)
def test_quantizing_in_row_chunks_is_quantizing_whole(kind, monkeypatch):
    from swarm.model import formats
    w = torch.randn(100, 64, dtype=torch.bfloat16)
    whole = formats.quantize(w, kind)
    monkeypatch.setattr(formats, "QUANTIZE_ROWS", 7)
    chunked = formats.quantize(w, kind)
    assert torch.equal(chunked.codes, whole.codes) and torch.equal(chunked.scales, whole.scales)
    assert (chunked.mins is None) == (whole.mins is None)
    assert chunked.mins is None or torch.equal(chunked.mins, whole.mins)
