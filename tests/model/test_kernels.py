"""swarm.model.kernels: every format's product against an exact model of its arithmetic and
against the dequantized float32 product; the torch fallback; the build without a compiler."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from swarm.model import kernels
from swarm.model.formats import BLOCK, QUANT_KINDS, quantize
from swarm.model.kernels import Linear, embedding, quantize_activations
from swarm.model.kernels.native import library


def exact(x: torch.Tensor, weight) -> torch.Tensor:
    """The kernels' arithmetic in float64: x rounded to int8 blocks (scale amax / 127), each block's
    dot product an integer, scaled by the weight's and x's block scales (q4_1 adds min * scale * sum).
    q8_0 weights take x and its rounding's residual (float32, as the kernels compute it) and sum both."""
    x = x.float()
    if weight.kind == "q8_0":
        return exact_once(x, weight) + exact_once(x - kernels.round_to_blocks(x), weight)
    return exact_once(x, weight)


def exact_once(x: torch.Tensor, weight) -> torch.Tensor:
    x = x.float()
    m, k = x.shape
    xb = x.reshape(m, -1, BLOCK)
    dx = xb.abs().amax(-1) / 127.0  # float32, as the kernels compute it
    inv = torch.where(dx != 0, 1.0 / dx, torch.zeros_like(dx))
    qx = torch.round(xb * inv[..., None]).double()  # [m, blocks, 32]
    w = weight.dequantize(torch.float64) if weight.kind == "q8_0" else None
    scales = weight.scales.double()
    if weight.kind == "q8_0":
        qw = weight.codes.double().reshape(weight.shape[0], -1, BLOCK)
    else:
        from swarm.model.formats import unpack_nibbles
        qw = unpack_nibbles(weight.codes).double().reshape(weight.shape[0], -1, BLOCK)
        if weight.kind == "q4_0":
            qw = qw - 8
    dots = torch.einsum("mbj,nbj->mnb", qx, qw)  # exact integers
    y = (dots * scales[None] * dx.double()[:, None, :]).sum(-1)
    if weight.kind == "q4_1":
        y = y + (weight.mins.double()[None] * (dx.double() * qx.sum(-1))[:, None, :]).sum(-1)
    del w
    return y


def relative_error(y, ref) -> float:
    return ((y.double() - ref.double()).abs().max() / (ref.double().abs().max() + 1e-12)).item()


@pytest.mark.parametrize("kind", QUANT_KINDS)
@pytest.mark.parametrize("m,n", [(1, 64), (1, 5), (3, 37), (8, 100), (17, 6)])
# Blocks a row: 3 and 9 (AVX2: eight at once + one; AVX-512: one part chunk of 16), 16 (one whole chunk),
# 17, 18 (SmolLM2's 576) and 22 (whole chunks + a part chunk of 1, 2, 6 blocks: q4 groups of 4 cut short,
# q8 pairs cut after one block)
@pytest.mark.parametrize("k", [96, 288, 512, 544, 576, 704])
def test_quantized_product_is_its_exact_arithmetic(kind, m, n, k):
    torch.manual_seed(m * 100 + n + k)
    w = quantize(torch.randn(n, k), kind)
    x = torch.randn(m, k)
    want = exact(x, w)
    assert relative_error(Linear(w)(x), want) < 1e-5
    assert relative_error(kernels.matmul_torch(x, w), want) < 1e-5
    bias = torch.randn(n)
    assert relative_error(Linear(w, bias)(x), want + bias.double()) < 1e-5
    # and it is the dequantized product up to rounding x to int8 blocks (half a step of max|x| / 127; q8_0
    # takes the rounding's residual too: half a step of that step / 127)
    assert relative_error(Linear(w)(x), x @ w.dequantize().T) < (2e-4 if kind == "q8_0" else 2e-2)
    yb = Linear(w)(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and relative_error(yb, exact(x.bfloat16(), w)) < 1e-2


@pytest.mark.parametrize("kind", QUANT_KINDS)
def test_extreme_codes_and_zero_blocks(kind):
    """Codes at both ends of their range (q8_0's -128 too, which a GGUF file may hold), x blocks of one
    sign at full scale and all-zero x blocks: the integer sums neither overflow nor lose a bit."""
    torch.manual_seed(6)
    n, k = 9, 18 * BLOCK
    w = quantize(torch.randn(n, k), kind)
    if kind == "q8_0":
        codes = torch.where(torch.rand(n, k) < 0.5, -128, 127).to(torch.int8)
    else:
        codes = torch.where(torch.rand(n, k // 2) < 0.5, 0x00, 0xff).to(torch.uint8)
    w = type(w)(kind, codes, w.scales, w.mins)
    x = torch.rand(2, k) * 100
    x[0, :BLOCK] = 0  # a zero block: scale 0
    x[1, 5 * BLOCK:6 * BLOCK] = -100  # one sign, all at amax
    assert relative_error(Linear(w)(x), exact(x, w)) < 1e-5


def test_native_kernels_are_built_here():
    lib = library()
    assert lib is not None, "a C compiler is on this machine: the native kernels must build"
    assert kernels.kernel_id() == f"{kernels.VERSION}-{lib.simd.replace(' ', '-')}"


def test_activation_rounding_moves_each_value_by_at_most_half_a_step():
    torch.manual_seed(9)
    x = torch.randn(4, 128)
    step = x.reshape(4, -1, BLOCK).abs().amax(-1, keepdim=True) / 127
    moved = (quantize_activations(x, "q4_0") - x).reshape(4, -1, BLOCK).abs()
    assert (moved <= step / 2 + 1e-7).all()
    finer = (quantize_activations(x, "q8_0") - x).reshape(4, -1, BLOCK).abs()  # the residual's step is step / 127
    assert (finer <= step / 254 + 1e-7).all()


def test_a_float32_prefill_is_bitwise_f_linear():
    """More than NATIVE_MAX_ROWS rows of x: the library's own call (float32 prefill stays its bits)."""
    torch.manual_seed(2)
    w, b, x = torch.randn(33, 40), torch.randn(33), torch.randn(2, 7, 40)
    assert x.numel() > kernels.NATIVE_MAX_ROWS * 40
    assert torch.equal(Linear(w, b)(x), F.linear(x, w, b))


@pytest.mark.parametrize("k", [7, 33, 50, 96, 576, 1536])  # tails of the 32-float step, and whole steps
def test_float32_decode_product_is_the_float_product(k):
    """A few rows of x (decode): the native float32 kernel, its own summation order, so within float32
    rounding of the exact product (not F.linear's bits); each row of a batch is summed as if alone."""
    torch.manual_seed(k)
    w, b, x = torch.randn(203, k), torch.randn(203), torch.randn(3, 1, k)
    lin = Linear(w, b)
    assert lin.takes_native(x)
    got = lin(x)
    assert got.shape == (3, 1, 203)
    want = x.double() @ w.double().T + b.double()
    assert ((got.double() - want).abs() <= 1e-6 * (x.double().abs() @ w.double().abs().T + b.double().abs())).all()
    for i in range(3):
        assert torch.equal(lin(x[i]), got[i])


@pytest.mark.parametrize("rows", [1, 3, 8, 20])
def test_bfloat16_product_sums_exact_products_in_float32(rows):
    torch.manual_seed(3)
    w, x = torch.randn(50, 64).bfloat16(), torch.randn(rows, 64)
    want = x.double() @ w.double().T
    assert relative_error(Linear(w)(x), want) < 1e-5  # native for few rows, torch's F.linear beyond
    yb = Linear(w)(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and relative_error(yb, x.bfloat16().double() @ w.double().T) < 1e-2


@pytest.mark.parametrize("k", [33, 50, 96, 576])  # K not a multiple of the 32 lanes of a vector, and 18 of them
def test_bfloat16_products_of_float32_and_bfloat16_x(k):
    """float32 x: exact products of x's float32 values (the AVX-512 kernel splits x into three bf16 parts);
    bfloat16 x goes in as it is, and each output is the exact sum rounded once to bfloat16."""
    torch.manual_seed(k)
    w, x = torch.randn(37, k).bfloat16(), torch.randn(2, k)
    assert relative_error(Linear(w)(x), x.double() @ w.double().T) < 1e-5
    xb = x.bfloat16()
    want = xb.double() @ w.double().T
    got = Linear(w)(xb).double()
    assert ((got - want).abs() <= want.abs() * 2 ** -8 + 1e-6 * want.abs().max()).all()


def test_float16_weights_compute():
    torch.manual_seed(3)
    w, x = torch.randn(50, 64).half(), torch.randn(3, 64)
    assert relative_error(Linear(w)(x), x.double() @ w.double().T) < 1e-5


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
import json, torch
from swarm.model import kernels
from swarm.model.formats import quantize
torch.manual_seed(0)
w = quantize(torch.randn(70, 64), "q4_0"); x = torch.randn(2, 64)
print(json.dumps({"id": kernels.kernel_id(), "y": kernels.Linear(w)(x).tolist()}))
"""


def _run(env: dict, tmp_path) -> dict:
    full = dict(os.environ, SWARM_CACHE_DIR=str(tmp_path), **env)
    out = subprocess.run([sys.executable, "-c", SNIPPET], env=full, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_torch_fallback_without_a_compiler_computes_the_same(tmp_path):
    built = _run({}, tmp_path / "a")
    assert not built["id"].endswith("torch")
    for env, where in [({"CC": "/nonexistent/cc"}, "b"), ({"SWARM_KERNELS": "torch"}, "c")]:
        fallback = _run(env, tmp_path / where)
        assert fallback["id"] == f"{kernels.VERSION}-torch"
        assert relative_error(torch.tensor(fallback["y"]), torch.tensor(built["y"])) < 1e-5
    assert not (tmp_path / "b" / "kernels").exists() or not list((tmp_path / "b" / "kernels").rglob("*.so"))


@pytest.mark.parametrize("kind", QUANT_KINDS + ("bf16", "f32"))
def test_products_over_two_threads_are_the_one_thread_products(kind):
    """OpenMP splits the rows over threads; each row is still computed by one thread, bit for bit."""
    torch.manual_seed(8)
    w = torch.randn(203, 576)
    w = w.bfloat16() if kind == "bf16" else w if kind == "f32" else quantize(w, kind)
    x = torch.randn(3, 576)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = Linear(w)(x[:1]), Linear(w)(x)
        torch.set_num_threads(2)
        two = Linear(w)(x[:1]), Linear(w)(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
