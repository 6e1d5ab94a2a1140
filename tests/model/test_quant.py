"""Quantized shards: the bytes the planner counts, the tokens they produce, the fingerprint peers compare."""

from __future__ import annotations

import pytest

from swarm.discovery.txt import decode, encode, from_profile
from swarm.model.formats import QuantizedTensor
from swarm.model.local import LocalChain, generate
from swarm.model.profile import profile_device
from swarm.model.shard import Shard
from swarm.model.store import model_fingerprint, weights_fingerprint
from swarm.model.units import HEAD_QUANT, QUANT_KIND, ModelLayout
from tests.helpers.reference import dequantized_reference_generate

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
    # a block's matrices: 34 bytes (q8_0) or 20 bytes (q4_1) per 32 weights, against 128 in float32
    ratio = {"int8": 0.28, "int4": 0.17}[mode]  # and the norms and biases
    assert per_unit[1] < ratio * float_bytes[1]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_shard_holds_gguf_blocks(tiny_model_dir, mode):
    shard = Shard.load(tiny_model_dir, 0, 6, quant=mode)
    block = shard.weights.blocks[0]
    assert block.down.kind == QUANT_KIND[mode]
    assert isinstance(shard.weights.embedding, QuantizedTensor)
    assert shard.weights.embedding.kind == shard.weights.head.kind == QUANT_KIND[HEAD_QUANT[mode]]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_chains_match_transformers_on_the_dequantized_weights(tiny_model_dir, mode):
    """Every cut gives the same tokens, and they are transformers' own greedy tokens on the
    dequantized weights with each linear's input rounded to int8 blocks, as the kernels do."""
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
    """The tied head of a whole-model int8/int4 shard is the q8_0 embedding itself: one copy."""
    layout = ModelLayout.read(smollm2_dir)
    shard = Shard.load(smollm2_dir, 0, layout.num_units, quant=mode)
    assert shard.weights.head.codes.data_ptr() == shard.weights.embedding.codes.data_ptr()
    counted = layout.unit_weight_bytes("float32", mode)
    assert shard.weight_bytes == sum(counted) - counted[0]  # the planner counts the head's copy apart
