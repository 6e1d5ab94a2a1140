"""The compact block against the library's own decoder layer (bit for bit in float32 on torch's kernels), and
the native one-call decode block against the torch block."""

from __future__ import annotations

import pytest
import torch

from swarm.model import hf
from swarm.model.block import Block, BlockShape, rope
from swarm.model.formats import quantize
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
    return model, layer, Block(index, BlockShape.from_config(model.config.to_dict()), weights)


def _cache(model, index: int, slots: int = 3, dtype: torch.dtype = torch.float32) -> SlotKVCache:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return SlotKVCache([index], slots, 32, c.num_key_value_heads, head_dim, dtype, torch.device("cpu"))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("kernels", ["torch", "native"])
@torch.inference_mode()
def test_the_block_is_the_library_layer(tiny_model_factory, family, kernels, monkeypatch):
    """float32: on torch's kernels (no C compiler, SWARM_KERNELS=torch) the block is the library's layer bit
    for bit, prefill and decode; on the native kernels a prefill still is (the BLAS's products), and a
    decode step (native float32 products and the one-call block: float32 sums in their own order) agrees
    to float32 rounding."""
    if kernels == "torch":
        monkeypatch.setenv("SWARM_KERNELS", "torch")
    model, layer, block = _layer_and_block(tiny_model_factory(family), 1)
    assert (block.decoder is None) == (kernels == "torch")
    rotary = model.model.rotary_emb
    theirs, ours = _cache(model, 1), _cache(model, 1)
    torch.manual_seed(0)
    # prefill (plain causal), decode (one token, no mask), then rows of different lengths (a mask), then one
    # token of one sequence (the native block's case)
    steps = [([0, 1, 2], [5, 5, 5], 5), ([0, 1, 2], [1, 1, 1], 1), ([0, 2], [3, 1], 3), ([1], [1], 1)]
    exact = True  # until a native decode step has written the caches
    for slots, real, width in steps:
        x = torch.randn(len(slots), width, model.config.hidden_size)
        plan = plan_step([theirs.lengths[s] for s in slots], real, width, x.device)
        cos, sin = rotary(x, plan.position_ids)
        for cache in (theirs, ours):
            cache.begin_step(slots, width)
        want = layer(x, attention_mask=plan.mask, position_ids=plan.position_ids,
                     position_embeddings=(cos, sin), cache=theirs)
        got = block(x, rope(cos, sin), ours, plan.mask)
        exact = exact and (kernels == "torch" or width > 1)
        if exact:
            assert torch.equal(got, want), (family, slots, width, (got - want).abs().max())
        else:
            assert 0 < relative_error(got, want) < 1e-5, (family, slots, width)
        for cache in (theirs, ours):
            for s, n in zip(slots, real):
                cache.lengths[s] += n
    for a, b in ((theirs.keys[0], ours.keys[0]), (theirs.values[0], ours.values[0])):
        assert torch.equal(a, b) if kernels == "torch" else relative_error(a, b) < 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("kind,dtype", [("q8_0", torch.float32), ("q4_0", torch.float32), ("q4_1", torch.float32),
                                        ("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                        ("q4_1", torch.bfloat16)])
@torch.inference_mode()
def test_the_native_decode_block_is_the_torch_block(tiny_model_factory, family, kind, dtype):
    """One token of one sequence goes through native.c's one-call block (quantized, float32 or bfloat16
    weights, float32 or bfloat16 activations): its output and the cache row it writes agree with the same block's
    torch operators (the same products) to float32 rounding (bfloat16's where the block holds bfloat16),
    and each path reads what the other wrote."""
    model, _, _ = _layer_and_block(tiny_model_factory(family), 1)
    weights = {k: ((v.to(dtype) if kind in ("bfloat16", "float32") else quantize(v, kind)) if k.endswith("proj.weight")
                   else v.to(dtype)) for k, v in model.state_dict().items() if k.startswith("model.layers.1.")}
    block = Block(1, BlockShape.from_config(model.config.to_dict()), weights)
    assert block.decoder is not None, "a C compiler is here: quantized, float32 and bfloat16 blocks decode natively"
    rotary, caches = model.model.rotary_emb, (_cache(model, 1, dtype=dtype), _cache(model, 1, dtype=dtype))
    # float32: 1e-5, but q8_0 rounds x's residual to int8 blocks too, at steps of max|x| / 127^2 of a block,
    # where the two paths' float32 differences (1e-7) flip a code now and then
    tolerance = (1e-4 if kind == "q8_0" else 1e-5) if dtype == torch.float32 else 3e-2
    torch.manual_seed(1)
    slot, hidden = [2], model.config.hidden_size
    steps = [torch.randn(1, 6, hidden)] + [torch.randn(1, 1, hidden) * 3 for _ in range(3)]
    for n, x in enumerate(steps):
        x = x.to(dtype)
        plan = plan_step([caches[0].lengths[2]], [x.shape[1]], x.shape[1], x.device)
        tables = rope(*rotary(x, plan.position_ids))
        outs = []
        for path, cache in enumerate(caches):
            cache.begin_step(slot, x.shape[1])
            # path 0 native (where the step allows it), path 1 torch; at step 2 they swap caches' writers
            native = block.decoder if (path == 0) != (n == 2) else None
            block.decoder, saved = native, block.decoder or native
            outs.append(block(x, tables, cache, plan.mask))
            block.decoder = saved
            cache.lengths[2] += x.shape[1]
        assert outs[0].dtype == outs[1].dtype == dtype
        assert relative_error(outs[0], outs[1]) < tolerance, (family, kind, n)
        assert relative_error(caches[0].keys[0], caches[1].keys[0]) < tolerance
        assert relative_error(caches[0].values[0], caches[1].values[0]) < tolerance
    assert caches[0].keys[0][2, :, 8].abs().sum() > 0 and caches[0].keys[0][:2].abs().sum() == 0  # slot 2's row 8


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@torch.inference_mode()
def test_without_native_kernels_a_quantized_block_decodes_on_torch(tiny_model_factory, monkeypatch):
    """SWARM_KERNELS=torch (as with no C compiler): no native decoder, and the one-token step still runs."""
    monkeypatch.setenv("SWARM_KERNELS", "torch")
    model, _, _ = _layer_and_block(tiny_model_factory("llama"), 1)
    weights = {k: quantize(v, "q4_1") if k.endswith("proj.weight") else v
               for k, v in model.state_dict().items() if k.startswith("model.layers.1.")}
    block = Block(1, BlockShape.from_config(model.config.to_dict()), weights)
    assert block.decoder is None
    cache, x = _cache(model, 1), torch.randn(1, 1, model.config.hidden_size)
    plan = plan_step([0], [1], 1, x.device)
    cache.begin_step([0], 1)
    out = block(x, rope(*model.model.rotary_emb(x, plan.position_ids)), cache, plan.mask)
    assert out.shape == x.shape and torch.isfinite(out).all() and cache.keys[0][0, :, 0].abs().sum() > 0


@pytest.mark.parametrize("kind", ["float32", "q8_0", "q4_1"])
@torch.inference_mode()
def test_a_batch_decodes_natively_each_row_as_if_alone(tiny_model_factory, kind):
    """One new token of each of three sequences of different lengths (slots out of order) is one native call:
    each row is bit for bit its sequence decoded alone (output and cache row), and the torch block (with the
    mask such a batch needs) agrees to float32 rounding."""
    model, _, _ = _layer_and_block(tiny_model_factory("qwen2"), 1)  # Qwen2: q/k/v biases too
    weights = {k: (v if kind == "float32" else quantize(v, kind)) if k.endswith("proj.weight") else v
               for k, v in model.state_dict().items() if k.startswith("model.layers.1.")}
    block = Block(1, BlockShape.from_config(model.config.to_dict()), weights)
    assert block.decoder is not None
    rotary, hidden, lengths = model.model.rotary_emb, model.config.hidden_size, {2: 5, 0: 3, 1: 7}
    torch.manual_seed(2)
    prefilled = _cache(model, 1)
    for slot, n in lengths.items():  # each sequence's prompt (the torch path)
        x = torch.randn(1, n, hidden)
        plan = plan_step([0], [n], n, x.device)
        prefilled.begin_step([slot], n)
        block(x, rope(*rotary(x, plan.position_ids)), prefilled, plan.mask)
        prefilled.lengths[slot] = n
    slots, x = list(lengths), torch.randn(3, 1, hidden) * 3

    def step(rows: list[int], native: bool, cache: SlotKVCache) -> torch.Tensor:
        plan = plan_step([cache.lengths[s] for s in rows], [1] * len(rows), 1, x.device)
        cache.begin_step(rows, 1)
        block.decoder, saved = (block.decoder if native else None), block.decoder
        try:
            return block(x[[slots.index(s) for s in rows]], rope(*rotary(x, plan.position_ids)), cache, plan.mask)
        finally:
            block.decoder = saved

    caches = []
    for _ in range(3):
        cache = _cache(model, 1)
        cache.keys[0].copy_(prefilled.keys[0]), cache.values[0].copy_(prefilled.values[0])
        cache.lengths = list(prefilled.lengths)
        caches.append(cache)
    together = step(slots, True, caches[0])
    alone = torch.cat([step([s], True, caches[1]) for s in slots])
    torched = step(slots, False, caches[2])
    assert torch.equal(together, alone)
    assert torch.equal(caches[0].keys[0], caches[1].keys[0]) and torch.equal(caches[0].values[0], caches[1].values[0])
    tolerance = 1e-4 if kind == "q8_0" else 1e-5  # q8_0: its residual's rounding (above)
    assert 0 < relative_error(together, torched) < tolerance
    assert relative_error(caches[0].keys[0], caches[2].keys[0]) < tolerance
    for slot, n in lengths.items():  # each token went to its own sequence's next position
        assert caches[0].keys[0][slot, :, n].abs().sum() > 0 and caches[0].keys[0][slot, :, n + 1:].abs().sum() == 0
