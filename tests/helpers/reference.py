"""transformers' own generate, the reference every shard path is compared with."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import torch

from swarm.model import hf


@functools.lru_cache(maxsize=4)
def _reference(model_dir: Path):
    model = hf.reference_model(model_dir)
    # No stop token: the reference must produce exactly max_new_tokens, like the shard path
    # asked for no stop ids (min_new_tokens would instead bend the logits of the stop token).
    model.generation_config.eos_token_id = None
    return model


def reference_generate(model_dir: Path, prompts: list[list[int]], max_new_tokens: int,
                       stop_ids: Sequence[int] = ()) -> list[list[int]]:
    """Greedy continuation of each prompt, one prompt at a time (no padding involved).

    With ``stop_ids``, generate stops at the first of them (and returns it), as a server does."""
    model = _reference(Path(model_dir))
    stop = {"eos_token_id": sorted(stop_ids), "pad_token_id": min(stop_ids)} if stop_ids else {}
    out = []
    for prompt in prompts:
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, **stop)
        out.append(ids[0, len(prompt):].tolist())
    return out


def dequantized_reference_model(model_dir: Path, mode: str):
    """transformers' model with every weight replaced by what ``--quant mode`` holds, dequantized,
    and every linear taking its input rounded to int8 blocks as swarm's kernels round it for the weight's
    format (``quantize_activations``).

    Each checkpoint matrix is quantized on its own to GGUF blocks (q8_0 for int8, q4_1 for
    int4; the embedding and head q8_0), exactly as the shard quantizes it: blocks run along
    each row, so the shard's fused q/k/v rows are the same rows.
    """
    from swarm.model.formats import quantize
    from swarm.model.kernels import quantize_activations
    from swarm.model.units import HEAD_QUANT, QUANT_KIND

    def roundtrip(weight: torch.Tensor, how: str) -> torch.Tensor:
        return quantize(weight.detach().float(), QUANT_KIND[how]).dequantize()

    def with_rounded_input(linear: torch.nn.Linear, kind: str):
        def forward(x: torch.Tensor) -> torch.Tensor:
            xq = quantize_activations(x.reshape(-1, x.shape[-1]), kind).reshape(x.shape)
            return torch.nn.functional.linear(xq, linear.weight, linear.bias)
        return forward

    model = hf.reference_model(Path(model_dir))
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        for layer in model.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(roundtrip(module.weight, mode))
                    module.forward = with_rounded_input(module, QUANT_KIND[mode])
        if model.lm_head.weight is model.model.embed_tokens.weight:
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())
        model.model.embed_tokens.weight.copy_(roundtrip(model.model.embed_tokens.weight, HEAD_QUANT[mode]))
        model.lm_head.weight.copy_(roundtrip(model.lm_head.weight, HEAD_QUANT[mode]))
        model.lm_head.forward = with_rounded_input(model.lm_head, QUANT_KIND[HEAD_QUANT[mode]])
    return model
