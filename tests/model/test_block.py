"""The compact block against the library's own decoder layer, bit for bit in float32."""

from __future__ import annotations

import pytest
import torch

from swarm.model import hf
from swarm.model.block import Block, BlockShape, rope
from swarm.model.shard import SlotKVCache, plan_step


def _layer_and_block(model_dir, index: int):
    model = hf.reference_model(model_dir)
    layer = model.model.layers[index]
    for param in layer.parameters():
        # Fresh (aligned) copies, as the shard holds them: the BLAS takes another code path for a
        # weight at an odd address inside the checkpoint's memory map, with other last bits.
        param.data = param.data.clone()
    prefix = f"model.layers.{index}."
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(prefix)}
    return model, layer, Block(index, BlockShape.from_config(model.config), weights)


def _cache(model, index: int, slots: int = 3) -> SlotKVCache:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return SlotKVCache([index], slots, 32, c.num_key_value_heads, head_dim, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@torch.inference_mode()
def test_the_block_is_the_library_layer_bit_for_bit(tiny_model_factory, family):
    model, layer, block = _layer_and_block(tiny_model_factory(family), 1)
    rotary = model.model.rotary_emb
    theirs, ours = _cache(model, 1), _cache(model, 1)
    torch.manual_seed(0)
    # prefill (plain causal), decode (one token, no mask), then rows of different lengths (a mask)
    steps = [([0, 1, 2], [5, 5, 5], 5), ([0, 1, 2], [1, 1, 1], 1), ([0, 2], [3, 1], 3), ([1], [1], 1)]
    for slots, real, width in steps:
        x = torch.randn(len(slots), width, model.config.hidden_size)
        plan = plan_step([theirs.lengths[s] for s in slots], real, width, x.device)
        cos, sin = rotary(x, plan.position_ids)
        for cache in (theirs, ours):
            cache.begin_step(slots, width)
        want = layer(x, attention_mask=plan.mask, position_ids=plan.position_ids,
                     position_embeddings=(cos, sin), cache=theirs)
        got = block(x, rope(cos, sin), ours, plan.mask)
        assert torch.equal(got, want), (family, slots, width, (got - want).abs().max())
        for cache in (theirs, ours):
            for s, n in zip(slots, real):
                cache.lengths[s] += n
    assert torch.equal(theirs.keys[0], ours.keys[0]) and torch.equal(theirs.values[0], ours.values[0])
