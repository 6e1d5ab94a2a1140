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
