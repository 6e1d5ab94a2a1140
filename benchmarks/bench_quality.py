"""What fewer bits cost: perplexity on held-out text and greedy agreement with float32, per weight format.

Perplexity is measured on benchmarks/data/heldout_en.txt (about 4.7 kB of plain
English written for this repository, so no model was trained on it), fed as one
sequence through the same shards the peers run: the body's hidden states for every
position, then the head shard's norm and output head. Greedy agreement: 5 prompts x
64 new tokens per format against the float32 shard (which equals transformers'
``generate``): the matching tokens, and how many come before the first difference.

    python benchmarks/bench_quality.py [--model PATH] [--json]

With ``--gguf-types Q8_0,Q4_0,... --llama-cpp BUILD/bin`` it measures, instead, what each
GGUF type costs as swarm holds it: llama.cpp's ``llama-quantize`` makes one file per type
from the model's F32 GGUF (the bundled Q4_1 default is dequantized to F32 first), and
each file's perplexity as swarm computes it (Q4_0/Q4_1 kept as int4 blocks, Q8_0 as int8
blocks, K-quants and the rest re-quantized per tensor to the nearest: int4 for the 4-bit
types, int8 otherwise) is reported against the same file dequantized to float32. The
F32 row is our own int8 / int4 quantizer on float weights.

    python benchmarks/bench_quality.py --gguf-types F32,Q8_0,Q4_0,Q4_1,Q5_0,Q4_K_M,Q5_K_M,Q6_K \
        --llama-cpp BUILD/bin --json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from swarm.model import hf
from swarm.model.local import LocalChain, generate
from swarm.model.shard import Shard
from swarm.model.store import resolve_model
from swarm.model.units import ModelLayout

TEXT_FILE = Path(__file__).parent / "data" / "heldout_en.txt"
FORMATS = {  # name -> Shard.load keywords
    "float32": {"dtype": "float32"},
    "bfloat16": {"dtype": "bfloat16"},
    "int8": {"dtype": "float32", "quant": "int8"},
    "int4": {"dtype": "float32", "quant": "int4"},
}
PROMPTS = ["The capital of France is", "Write a haiku about the sea. The waves",
           "The three most important inventions of the last century are",
           "def fibonacci(n):", "Once upon a time, in a small village by the mountains,"]
NEW_TOKENS = 64


@torch.inference_mode()
def perplexity(model_dir: Path, ids: list[int], **load) -> float:
    """exp(mean negative log-likelihood) of ids[1:] given the tokens before each."""
    last = ModelLayout.read(model_dir).num_units - 1
    body = Shard.load(model_dir, 0, last, max_len=len(ids), **load)
    head = Shard.load(model_dir, last, last + 1, max_len=len(ids), **load)
    body.open_slot(0)
    hidden = body.step([0], torch.tensor([ids]))  # [1, T, H]
    logits = head.logits(hidden)[0, :-1]  # [T - 1, V]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    return math.exp(nll.item())


def held_quant(gguf_type: str) -> str:
    """The quant swarm computes a GGUF type's file in: the 4-bit types in int4, the rest in int8."""
    return "int4" if gguf_type.startswith(("Q4_", "IQ4", "Q3_", "Q2_")) else "int8"


def gguf_type_files(model: Path, types: list[str], bin_dir: Path) -> dict[str, Path]:
    """One GGUF file per type, made once by llama-quantize from the model's F32 GGUF (bench_shard's files)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_shard import f32_gguf, llama_cpp_files

    return llama_cpp_files(bin_dir, f32_gguf(model, bin_dir), types)


def gguf_types_report(model: Path, types: list[str], bin_dir: Path, ids: list[int]) -> dict:
    out = {}
    for kind, path in gguf_type_files(model, types, bin_dir).items():
        dense = perplexity(path, ids, dtype="float32")
        quants = ["int8", "int4"] if kind == "F32" else [held_quant(kind)]
        for quant in quants:
            held = perplexity(path, ids, dtype="float32", quant=quant)
            name = kind if len(quants) == 1 else f"{kind} as {quant}"
            out[name] = {"held_as": quant, "perplexity": round(held, 4), "dequantized_float32": round(dense, 4),
                         "vs_dequantized": round(held / dense - 1, 4), "file_bytes": path.stat().st_size}
            print(f"  {name:12s} held as {quant}: ppl {held:8.3f} against {dense:8.3f} dequantized "
                  f"({100 * (held / dense - 1):+.2f}%)", file=sys.stderr, flush=True)
    return out


def agreement(a: list[int], b: list[int]) -> tuple[int, int]:
    """(matching positions, length of the common prefix)."""
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return sum(x == y for x, y in zip(a, b)), prefix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gguf-types", default=None,
                        help="comma-separated GGUF types (F32, Q8_0, Q4_0, Q4_K_M, ...): each file against itself "
                             "dequantized (needs --llama-cpp)")
    parser.add_argument("--llama-cpp", type=Path, default=None, help="llama.cpp's build/bin (llama-quantize)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    tokenizer = hf.load_tokenizer(model_dir)
    ids = tokenizer(TEXT_FILE.read_text())["input_ids"]
    if args.gguf_types:
        if args.llama_cpp is None:
            raise SystemExit("error: --gguf-types needs --llama-cpp BUILD/bin (llama-quantize makes the files)")
        report = {"model": model_dir.name, "text": TEXT_FILE.name, "text_tokens": len(ids),
                  "types": gguf_types_report(model_dir, args.gguf_types.split(","), args.llama_cpp, ids)}
        print(json.dumps(report) if args.json else json.dumps(report, indent=1))
        return
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    num_units = ModelLayout.read(model_dir).num_units

    results, greedy = {}, {}
    for name, load in FORMATS.items():
        chain = LocalChain.load(model_dir, [(0, num_units)], max_slots=len(prompts),
                                max_len=max(map(len, prompts)) + NEW_TOKENS, **load)
        greedy[name] = generate(chain, prompts, NEW_TOKENS)
        del chain
        results[name] = {"perplexity": round(perplexity(model_dir, ids, **load), 4)}
    base = results["float32"]["perplexity"]
    for name, entry in results.items():
        entry["perplexity_vs_float32"] = round(entry["perplexity"] / base - 1, 4)
        pairs = [agreement(a, b) for a, b in zip(greedy[name], greedy["float32"])]
        entry["greedy_tokens_equal"] = sum(m for m, _ in pairs)
        entry["greedy_common_prefix"] = [p for _, p in pairs]
    out = {"model": model_dir.name, "text": TEXT_FILE.name, "text_tokens": len(ids),
           "greedy": f"{len(prompts)} prompts x {NEW_TOKENS} tokens", "formats": results}
    if args.json:
        print(json.dumps(out))
        return
    print(f"{out['model']}: perplexity on {out['text']} ({len(ids)} tokens); greedy agreement with float32 "
          f"over {out['greedy']}")
    for name, e in results.items():
        print(f"  {name:9s} ppl {e['perplexity']:8.3f} ({100 * e['perplexity_vs_float32']:+.2f}%)  "
              f"greedy {e['greedy_tokens_equal']}/{len(prompts) * NEW_TOKENS} equal, "
              f"common prefixes {e['greedy_common_prefix']}")


if __name__ == "__main__":
    main()
