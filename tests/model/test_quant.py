"""Quantized shards: the bytes the planner counts, the numbers the kernels compute, the fingerprint peers compare."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from swarm.discovery.txt import decode, encode, from_profile
from swarm.model import quant
from swarm.model.local import LocalChain, generate
from swarm.model.profile import profile_device
from swarm.model.shard import Shard
from swarm.model.store import model_fingerprint, weights_fingerprint
from swarm.model.units import HEAD_QUANT, ModelLayout
from tests.model.reference import dequantized_reference_generate

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41]]
NEW_TOKENS = 32


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_shard_weight_bytes_are_what_the_planner_counts(tiny_model_factory, family, mode):
    model_dir = tiny_model_factory(family)
    layout = ModelLayout.read(model_dir)
    per_unit = layout.unit_weight_bytes("float32", mode)
    for start, end in [(0, 1), (1, 5), (2, 3), (5, 6), (0, 6)]:
        shard = Shard.load(model_dir, start, end, quant=mode)
        assert shard.weight_bytes == sum(per_unit[start:end]), (start, end)
    float_bytes = layout.unit_weight_bytes("float32")
    # a block's matrices: 1 byte (int8) or 5/8 byte (int4: 4 bits + a bf16 scale and zero per 32) a weight
    ratio = {"int8": 0.27, "int4": 0.18}[mode]
    assert per_unit[1] < ratio * float_bytes[1]


def test_int8_and_int4_linears_compute_their_dequantized_weights():
    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    x = torch.randn(3, 5, 256)
    for module, deq in [
        (quant.Int8Linear.from_linear(linear), quant.dequantize_int8_rows(*quant.quantize_int8_rows(linear.weight))),
        (quant.Int4Linear.from_linear(linear), quant.dequantize_int4_groups(*quant.quantize_int4_groups(linear.weight))),
    ]:
        want = x @ deq.T + linear.bias
        got = module(x)
        assert got.shape == want.shape and got.dtype == torch.float32
        # bfloat16 activations: a relative error of a few 2^-8
        assert (got - want).abs().max() < 0.02 * want.abs().max()
    # and the dequantized weights are the float ones within half a step
    w = linear.weight.detach()
    step8 = w.abs().amax(1, keepdim=True) / 127
    assert ((quant.dequantize_int8_rows(*quant.quantize_int8_rows(w)) - w).abs() <= 0.51 * step8 + 1e-6).all()
    groups = w.view(96, -1, 32)
    step4 = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(32, dim=1)
    assert ((quant.dequantize_int4_groups(*quant.quantize_int4_groups(w)) - w).abs() <= 0.51 * step4 + 2e-3).all()


def test_a_fused_projection_gives_each_part_whatever_the_call_order():
    torch.manual_seed(0)
    parts = [nn.Linear(32, n) for n in (32, 16, 16)]
    owner = nn.Module()
    owner.q_proj, owner.k_proj, owner.v_proj = parts
    layer = nn.Module()
    layer.self_attn = owner
    x, y = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    want = [p(x) for p in parts]
    quant.fuse_projections(layer)
    assert isinstance(owner.q_proj, quant.ProjectionPart)
    assert torch.equal(owner.q_proj(x), want[0])
    assert torch.equal(owner.v_proj(x), want[2])  # out of order
    assert torch.equal(owner.k_proj(y), parts[1](y))  # another input in between
    assert torch.equal(owner.k_proj(x), want[1])
    assert torch.equal(owner.k_proj(x), want[1])  # the same part twice recomputes
    assert torch.equal(owner.q_proj(x), want[0]) and torch.equal(owner.v_proj(x), want[2])
    assert owner.q_proj.fused._input is None  # nothing held once every part was handed out


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_chains_match_transformers_on_the_dequantized_weights(tiny_model_dir, mode):
    """Every cut gives the same tokens, and they are transformers' own greedy tokens on the
    dequantized weights (the kernels multiply in bfloat16: the tiny model's logits are far apart)."""
    expected = dequantized_reference_generate(tiny_model_dir, mode, PROMPTS, NEW_TOKENS)
    for cut in ([(0, 6)], [(0, 2), (2, 4), (4, 6)], [(0, 1), (1, 5), (5, 6)]):
        chain = LocalChain.load(tiny_model_dir, cut, max_slots=len(PROMPTS), max_len=64, quant=mode)
        assert generate(chain, PROMPTS, NEW_TOKENS) == expected, f"{mode} cut {cut}"


def test_the_quantization_is_part_of_the_fingerprint_profile_and_announcement(tiny_model_dir):
    plain = model_fingerprint(tiny_model_dir)
    assert weights_fingerprint(tiny_model_dir, None) == plain
    fps = {weights_fingerprint(tiny_model_dir, q) for q in ("int8", "int4")}
    assert len(fps) == 2 and plain not in fps
    profile = profile_device(tiny_model_dir, threads=1, quant="int4").to_json()
    assert profile["model"]["quant"] == "int4"
    assert profile["model"]["fingerprint"] == weights_fingerprint(tiny_model_dir, "int4")
    layout = ModelLayout.read(tiny_model_dir)
    assert [u["weight_bytes"] for u in profile["units"]] == layout.unit_weight_bytes("float32", "int4")
    announced = decode(encode(from_profile(profile, "p1", "peer")))
    assert announced.quant == "int4" and announced.fingerprint == weights_fingerprint(tiny_model_dir, "int4")[:16]
    assert decode(encode(from_profile(profile_device(tiny_model_dir, threads=1).to_json(), "p2", "x"))).quant == ""


def test_unknown_quantization_and_gpu_quantization_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="unknown quantization"):
        Shard.load(tiny_model_dir, 0, 6, quant="int3")
    with pytest.raises(ValueError, match="CPU"):
        Shard.load(tiny_model_dir, 0, 6, quant="int8", device="meta")
    assert HEAD_QUANT["int4"] == "int8"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_smollm2_quantized_tied_head_shares_the_embedding(smollm2_dir, mode):
    """The tied head of a whole-model int8/int4 shard is the int8 embedding itself: one copy."""
    layout = ModelLayout.read(smollm2_dir)
    shard = Shard.load(smollm2_dir, 0, layout.num_units, quant=mode)
    assert shard.head.qweight is shard.embed.qweight
    counted = layout.unit_weight_bytes("float32", mode)
    assert shard.weight_bytes == sum(counted) - counted[0]  # the planner counts the head's copy apart
