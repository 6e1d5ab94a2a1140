"""Decode ms/token: the shard path (whole model in one shard, one process) against transformers' generate.

SmolLM2-135M-Instruct, float32, one torch thread, a 32-token prompt and 96 new
tokens, greedy. Runs alternate between the two paths in ABBA order so that noise and drift
land on both; medians are reported.

    python benchmarks/bench_shard.py [--runs 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from swarm.model import hf
from swarm.model.local import LocalChain, stream_generate
from swarm.model.store import resolve_model
from swarm.model.units import ModelLayout

PROMPT_TOKENS = 32
NEW_TOKENS = 96
TEXT = ("Edge devices such as phones, laptops and small servers sit idle most of the day. "
        "Splitting a language model across them lets a household run models that none of them could run alone.")


class StepClock:
    """A generate() streamer that only records when each new token arrived."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def decode_ms_per_token(times: list[float]) -> float:
    """Mean gap between consecutive new tokens (prefill excluded), in ms."""
    return 1000 * (times[-1] - times[0]) / (len(times) - 1)


def time_transformers(model, prompt: list[int]) -> tuple[float, list[int]]:
    clock = StepClock()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, streamer=clock)
    # put() is called once with the prompt, then once per new token
    return decode_ms_per_token(clock.times[1:]), out[0, len(prompt):].tolist()


def time_shards(chain: LocalChain, prompt: list[int]) -> tuple[float, list[int]]:
    times, tokens = [], []
    for step in stream_generate(chain, [prompt], NEW_TOKENS):
        times.append(time.perf_counter())
        tokens.append(step[0][1])
    return decode_ms_per_token(times), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_dir = resolve_model(None)
    tokenizer = hf.load_tokenizer(model_dir)
    prompt = tokenizer(TEXT)["input_ids"][:PROMPT_TOKENS]
    assert len(prompt) == PROMPT_TOKENS
    reference = hf.reference_model(model_dir)
    reference.generation_config.eos_token_id = None  # always 96 tokens
    chain = LocalChain.load(model_dir, [(0, ModelLayout.read(model_dir).num_units)],
                            max_slots=1, max_len=PROMPT_TOKENS + NEW_TOKENS)
    time_transformers(reference, prompt), time_shards(chain, prompt)  # warm-up
    hf_ms, shard_ms = [], []
    for run in range(args.runs):
        # ABBA order: a machine that drifts slower (or faster) over time favours neither path.
        order = ("hf", "shard") if run % 2 == 0 else ("shard", "hf")
        for path in order:
            if path == "hf":
                ms, hf_tokens = time_transformers(reference, prompt)
                hf_ms.append(ms)
            else:
                ms, shard_tokens = time_shards(chain, prompt)
                shard_ms.append(ms)
    result = {
        "model": model_dir.name, "dtype": "float32", "threads": args.threads,
        "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "runs": args.runs,
        "transformers_ms_per_token": round(statistics.median(hf_ms), 2),
        "shard_ms_per_token": round(statistics.median(shard_ms), 2),
        "speedup": round(statistics.median(hf_ms) / statistics.median(shard_ms), 3),
        "same_tokens": hf_tokens == shard_tokens,
        "transformers_runs_ms": [round(x, 2) for x in hf_ms],
        "shard_runs_ms": [round(x, 2) for x in shard_ms],
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"transformers generate: {result['transformers_ms_per_token']:.2f} ms/token (median of {args.runs})")
        print(f"shard path:            {result['shard_ms_per_token']:.2f} ms/token (median of {args.runs})")
        print(f"speedup: {result['speedup']:.3f}x; identical tokens: {result['same_tokens']}")


if __name__ == "__main__":
    main()
