"""float32 shard decode against transformers' ``generate``: greedy tokens, and how close the logits are.

The float32 decode step runs on the native kernels (native.c's float32 products and one-call
block: float32 sums in another order than the BLAS's), so its logits differ from the library's
in the last bits. This checks that the tokens do not: for each prompt, 96 greedy tokens of one
sequence on the shard (one process holding the whole model, as a peer does) against
transformers' ``generate``, and, teacher-forced on the reference's tokens, the largest
difference of the shard's logits from the library's and the reference's smallest top-2 margin
(how near a tie came: a difference above the margin could flip a token).

    python benchmarks/bench_f32_identity.py [--model PATH] [--tokens 96] [--json]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from swarm.model import hf, kernels
from swarm.model.local import LocalChain
from swarm.model.store import resolve_model
from swarm.model.units import ModelLayout

PROMPTS = ["The capital of France is", "Write a haiku about the sea. The waves", "1, 2, 3, 4,",
           "Once upon a time, in a small village,", "def fibonacci(n):", "The theory of relativity explains",
           "Here is a recipe for pancakes:", "Q: What is the largest planet?\nA:"]


@torch.inference_mode()
def check(shard, reference, ids: list[int], tokens: int) -> dict:
    want = reference.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False)[0, len(ids):].tolist()
    shard.open_slot(0)
    token, got = shard.step([0], torch.tensor([ids])), []
    got.append(token.item())
    for _ in range(tokens - 1):
        token = shard.step([0], token[:, None])
        got.append(token.item())
    # teacher-forced on the reference's tokens: the shard's decode logits at each new position
    seen = []
    logits = shard.logits
    shard.logits = lambda hidden: seen.append(logits(hidden)) or seen[-1]
    try:
        shard.open_slot(0)
        shard.step([0], torch.tensor([ids]))
        for t in want[:-1]:
            shard.step([0], torch.tensor([[t]]))
    finally:
        del shard.logits
    ours = torch.cat(seen)  # [tokens, vocab]: after the prompt, then after each reference token
    theirs = reference(torch.tensor([ids + want[:-1]])).logits[0, len(ids) - 1:]
    top2 = theirs.topk(2, dim=-1).values
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    return {"identical": got == want, "first_difference": first,
            "max_logit_difference": (ours - theirs).abs().max().item(),
            "min_reference_top2_margin": (top2[:, 0] - top2[:, 1]).min().item(),
            "argmax_equal_teacher_forced": int((ours.argmax(-1) == theirs.argmax(-1)).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_dir = resolve_model(args.model)
    tokenizer = hf.load_tokenizer(model_dir)
    reference = hf.reference_model(model_dir)
    reference.generation_config.eos_token_id = None  # always --tokens tokens
    units = ModelLayout.read(model_dir).num_units
    shard = LocalChain.load(model_dir, [(0, units)], max_slots=1, max_len=64 + args.tokens,
                            dtype="float32").shards[0]
    rows = []
    for text in PROMPTS:
        row = {"prompt": text, **check(shard, reference, tokenizer(text)["input_ids"], args.tokens)}
        rows.append(row)
        if not args.json:
            print(f"{'same' if row['identical'] else 'DIFFERENT at ' + str(row['first_difference']):>16}  "
                  f"max |logit diff| {row['max_logit_difference']:.2e}  smallest top-2 margin "
                  f"{row['min_reference_top2_margin']:.2e}  {text!r}", flush=True)
    result = {"model": model_dir.name, "kernel_id": kernels.kernel_id(), "tokens": args.tokens,
              "identical_prompts": sum(r["identical"] for r in rows), "prompts": len(rows),
              "max_logit_difference": max(r["max_logit_difference"] for r in rows),
              "min_reference_top2_margin": min(r["min_reference_top2_margin"] for r in rows),
              "load_average": os.getloadavg()[0], "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['identical_prompts']}/{result['prompts']} prompts token-identical over {args.tokens} tokens "
              f"({result['kernel_id']}); largest logit difference {result['max_logit_difference']:.2e}, "
              f"smallest reference top-2 margin {result['min_reference_top2_margin']:.2e}")


if __name__ == "__main__":
    main()
