"""SmolLM2 across 3 local peers: the same greedy tokens as one process and as transformers."""

from __future__ import annotations


import pytest
import torch

from swarm.aio import bounded
from swarm.model import hf
from swarm.model.local import LocalChain, generate
from swarm.runtime.engine import Pipeline, PipelineConfig
from swarm.runtime.schedule import Layout, Mode

from tests.helpers.pipeline import plan_for

pytestmark = pytest.mark.slow

TEXTS = ["The capital of France is", "Write a haiku about the sea.", "1, 2, 3, 4,"]
NEW = 16


@pytest.fixture(scope="module")
def smol_case(smollm2_dir):
    tokenizer = hf.load_tokenizer(smollm2_dir)
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    chain = LocalChain.load(smollm2_dir, [(0, 32)], max_slots=len(prompts), max_len=64)
    local = generate(chain, prompts, NEW)
    del chain
    model = hf.reference_model(smollm2_dir)
    with torch.inference_mode():
        # transformers stops at the end-of-text token; the shard path runs on to NEW tokens.
        ref = [model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False)[0, len(p):].tolist()
               for p in prompts]
    return prompts, local, ref


@pytest.mark.parametrize("m, b, mode", [(1, 1, Mode.NO_BUBBLES), (2, 2, Mode.NO_BUBBLES), (3, 1, Mode.BUBBLES)])
async def test_smollm2_three_peers_token_identical(smollm2_dir, peers, smol_case, m, b, mode):
    prompts, local, ref = smol_case
    assert [row[: len(r)] for row, r in zip(local, ref)] == ref
    config = PipelineConfig(smollm2_dir, plan_for(peers, 3, num_units=32), layout=Layout(m, b), mode=mode, max_len=64)
    async with Pipeline(config) as pipe:
        got = await bounded(pipe.generate_all(prompts, NEW), 300)
    assert got == local
