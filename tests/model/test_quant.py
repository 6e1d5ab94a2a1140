"""Quantized shards: the bytes the planner counts, the tokens they produce, the fingerprint peers compare."""

from __future__ import annotations

import pytest
import torch

from swarm.discovery.txt import decode, encode, from_profile
from swarm.model.formats import QuantizedTensor
from swarm.model.local import LocalChain, generate
from swarm.model.profile import profile_device
from swarm.model.shard import Shard
from swarm.model.store import model_fingerprint, weights_fingerprint
from swarm.model.units import HEAD_QUANT, QUANT_KIND, ModelLayout
from tests.helpers.reference import dequantized_reference_model

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


CUTS = ([(0, 6)], [(0, 2), (2, 4), (4, 6)], [(0, 1), (1, 5), (5, 6)])
# mode -> (logits within this of the reference's, argmax the reference's unless its top-2 margin is below this).
# int8: measured 1.6e-3 at most (logits up to about 7): x's residual makes its rounding continuous, so only
# float32 summation order separates the two, and a token may differ only at a near tie. int4 rounds x once: a
# float32 difference that carries an activation across a rounding boundary moves later logits by up to 0.15
# (measured), so its bounds are looser; the kernels' own arithmetic is held to 1e-5 in test_kernels.py.
TOLERANCES = {"int8": (1e-2, 2e-2), "int4": (0.5, 0.3)}


@pytest.mark.parametrize("mode", ["int8", "int4"])
@torch.inference_mode()
def test_quantized_chains_match_transformers_on_the_dequantized_weights(tiny_model_dir, mode):
    """Teacher-forced on transformers' greedy tokens (the dequantized weights, each linear's input rounded as
    the kernels round it): at every position of every prompt, through every cut, one sequence at a time, the
    chain's logits are within TOLERANCES of the reference's and its argmax is the reference's unless the
    reference's top-2 margin is below the near-tie bound (and at 90% of all positions anyway). A batch's
    greedy tokens follow the reference's up to a near tie."""
    logit_tolerance, near_tie = TOLERANCES[mode]
    reference = dequantized_reference_model(tiny_model_dir, mode)
    wants, logits = [], []
    for prompt in PROMPTS:
        want = reference.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
        wants.append(want[0, len(prompt):].tolist())
        logits.append(reference(torch.tensor([prompt + wants[-1][:-1]])).logits[0, len(prompt) - 1:])
    margins = [(lambda top: top[:, 0] - top[:, 1])(t.topk(2, dim=-1).values) for t in logits]
    assert (torch.cat(margins) >= near_tie).float().mean() > 0.5, "positions that only a wrong kernel gets wrong"
    for cut in CUTS:
        chain = LocalChain.load(tiny_model_dir, cut, max_slots=len(PROMPTS), max_len=64, quant=mode)
        for prompt, want, theirs, margin in zip(PROMPTS, wants, logits, margins):
            ours = teacher_forced_logits(chain, prompt, want)
            assert (ours - theirs).abs().max() < logit_tolerance, (cut, prompt)
            same = ours.argmax(-1) == theirs.argmax(-1)
            assert (same | (margin < near_tie)).all() and same.float().mean() >= 0.9, (cut, prompt)
        for got, want, margin in zip(generate(chain, PROMPTS, NEW_TOKENS), wants, margins):
            first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
            assert first is None or margin[first] < near_tie, (cut, first)


def teacher_forced_logits(chain: LocalChain, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The chain's logits [len(tokens), vocab] in slot 0: after the prompt, then after each of tokens[:-1]."""
    head, seen = chain.shards[-1], []
    logits = head.logits
    head.logits = lambda hidden: seen.append(logits(hidden)) or seen[-1]
    try:
        chain.open_slot(0)
        chain.step([0], torch.tensor([prompt]))
        for token in tokens[:-1]:
            chain.step([0], torch.tensor([[token]]))
    finally:
        del head.logits
    return torch.cat(seen)


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
