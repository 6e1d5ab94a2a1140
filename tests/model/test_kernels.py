"""swarm.model.kernels: every kind's product against x @ W.dequantize().T in float32."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from swarm.model import kernels
from swarm.model.formats import QUANT_KINDS, quantize
from swarm.model.kernels import Linear, embedding

# The compiled path quantizes x to int8 blocks of 32 (as llama.cpp does): each x
# value moves by at most half a step (max|x_block| / 254), so the product's
# error is bounded by sum|w| * max|x| / 254 per output; we check a relative
# error below 2% of the output's scale. The torch path is exact up to rounding.
REL = 2e-2


def reference(x, weight, bias):
    w = weight.dequantize() if hasattr(weight, "dequantize") else weight.float()
    y = x.float() @ w.T
    return y if bias is None else y + bias.float()


def check(y, ref, rel=REL):
    assert y.shape == ref.shape
    err = (y.float() - ref).abs().max().item()
    scale = ref.abs().max().item() + 1e-6
    assert err <= rel * scale, f"error {err} vs scale {scale}"


@pytest.mark.parametrize("kind", QUANT_KINDS)
@pytest.mark.parametrize("m,n", [(1, 64), (3, 37), (8, 100), (17, 5)])
def test_quantized_product(kind, m, n):
    torch.manual_seed(m * 100 + n)
    k = 96
    w = quantize(torch.randn(n, k), kind)
    bias = torch.randn(n)
    x = torch.randn(m, k)
    check(Linear(w, bias)(x), reference(x, w, bias))
    check(Linear(w)(x), reference(x, w, None))
    yb = Linear(w, bias)(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    check(yb, reference(x.bfloat16(), w, bias), rel=4e-2)


@pytest.mark.parametrize("kind", QUANT_KINDS)
def test_torch_path_agrees(kind):
    torch.manual_seed(1)
    w = quantize(torch.randn(300, 64), kind)
    x = torch.randn(5, 64)
    check(kernels.matmul_torch(x, w), reference(x, w, None), rel=1e-5)


def test_float32_is_bitwise_f_linear():
    torch.manual_seed(2)
    w, b, x = torch.randn(33, 40), torch.randn(33), torch.randn(2, 7, 40)
    assert torch.equal(Linear(w, b)(x), F.linear(x, w, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_low_precision(dtype):
    torch.manual_seed(3)
    w, x = torch.randn(50, 64).to(dtype), torch.randn(3, 64)
    check(Linear(w)(x), reference(x, w, None), rel=1e-2)
    check(Linear(w)(x.bfloat16()), reference(x.bfloat16(), w, None), rel=2e-2)


@pytest.mark.parametrize("kind", QUANT_KINDS + ("float32",))
def test_fuse_equals_separate(kind):
    torch.manual_seed(4)
    ws = [torch.randn(n, 64) for n in (32, 16, 16)]
    if kind != "float32":
        ws = [quantize(w, kind) for w in ws]
    bs = [torch.randn(w.shape[0]) for w in ws]
    x = torch.randn(3, 64)
    fused = Linear.fuse(ws, bs)
    sep = torch.cat([Linear(w, b)(x) for w, b in zip(ws, bs)], dim=-1)
    assert torch.allclose(fused(x), sep, atol=1e-5)
    assert fused.weight_bytes == sum(Linear(w).weight_bytes for w in ws)


def test_weight_bytes_is_quantized_size():
    w = quantize(torch.randn(64, 64), "q4_1")
    assert Linear(w).weight_bytes == w.nbytes == 64 * 32 + 2 * 64 * 2 * 2


def test_embedding():
    torch.manual_seed(5)
    w = torch.randn(20, 64)
    ids = torch.tensor([[3, 0, 19]])
    assert torch.equal(embedding(w, ids), w[ids])
    q = quantize(w, "q8_0")
    assert torch.equal(embedding(q, ids), q.dequantize()[ids])


SNIPPET = """
import torch
from swarm.model.formats import quantize
from swarm.model.kernels import Linear
torch.manual_seed(0)
w = quantize(torch.randn(70, 64), "q4_0"); x = torch.randn(2, 64)
err = (Linear(w)(x) - x @ w.dequantize().T).abs().max().item()
assert err < 0.5, err
print("ok")
"""


@pytest.mark.parametrize("env", [{"SWARM_KERNELS": "torch"}, {"CC": "/nonexistent", "SWARM_KERNELS_CACHE": "fresh"}])
def test_fallbacks_in_subprocess(env, tmp_path):
    full = dict(os.environ, **env)
    if full.get("SWARM_KERNELS_CACHE") == "fresh":
        full["SWARM_KERNELS_CACHE"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", SNIPPET], env=full, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout
    if "CC" in env:
        assert out.stderr.count("falling back") <= 1
