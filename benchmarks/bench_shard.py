"""Decode ms/token of one shard holding the whole model, per weight format, beside transformers and llama.cpp.

SmolLM2-135M-Instruct (or --model), one torch thread, a 32-token prompt and 96 new
tokens, greedy. In every round each path generates once, in an order that rotates
from round to round, so noise and drift land on all of them; medians are reported,
with each path's ratio to the float32 shard measured in the same rounds.

Paths: transformers' ``generate`` (float32), the shard in float32, bfloat16, int8
and int4 (``--quant``), and, when ``--llama-cpp DIR`` holds a llama.cpp build
(llama-bench, llama-quantize) and ``--gguf`` an F32 GGUF of the same model,
llama.cpp F32, Q8_0 and Q4_0 (same prompt length, new tokens and threads; its
Q8_0/Q4_0 files are made from the F32 one). Also: a per-operation profile of one
float32 and one int4 decode step (torch.profiler, ms per step), each format's
weight bytes, and token agreement with float32. Each shard and transformers path
is timed on the wall clock and on its thread's CPU clock (steadier on a shared machine).

    python benchmarks/bench_shard.py [--runs 5] [--threads 1] [--json]
        [--llama-cpp PATH/TO/build/bin --gguf smollm2-f32.gguf]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from swarm.model import hf
from swarm.model.local import LocalChain, stream_generate
from swarm.model.store import resolve_model
from swarm.model.units import ModelLayout

PROMPT_TOKENS = 32
NEW_TOKENS = 96
PROFILE_STEPS = 16
TEXT = ("Edge devices such as phones, laptops and small servers sit idle most of the day. "
        "Splitting a language model across them lets a household run models that none of them could run alone.")
SHARD_PATHS = {  # name -> Shard.load keywords
    "shard float32": {"dtype": "float32"},
    "shard bfloat16": {"dtype": "bfloat16"},
    "shard int8": {"dtype": "float32", "quant": "int8"},
    "shard int4": {"dtype": "float32", "quant": "int4"},
}
LLAMA_CPP_TYPES = ("F32", "Q8_0", "Q4_0")


class StepClock:
    """A generate() streamer that only records when each new token arrived (wall and CPU clocks)."""

    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []

    def put(self, value) -> None:
        self.times.append(now())

    def end(self) -> None:
        pass


def now() -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds): on a shared machine the CPU clock leaves out
    the time other processes held the core, so it is the steadier of the two."""
    return time.perf_counter(), time.thread_time()


def decode_ms_per_token(times: list[tuple[float, float]]) -> tuple[float, float]:
    """Mean gap between consecutive new tokens (prefill excluded), in ms: (wall, CPU)."""
    return tuple(1000 * (times[-1][i] - times[0][i]) / (len(times) - 1) for i in (0, 1))


def time_transformers(model, prompt: list[int]) -> tuple[float, list[int]]:
    clock = StepClock()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, streamer=clock)
    # put() is called once with the prompt, then once per new token
    return decode_ms_per_token(clock.times[1:]), out[0, len(prompt):].tolist()


def time_shard(chain: LocalChain, prompt: list[int]) -> tuple[float, list[int]]:
    times, tokens = [], []
    for step in stream_generate(chain, [prompt], NEW_TOKENS):
        times.append(now())
        tokens.append(step[0][1])
    return decode_ms_per_token(times), tokens


def op_profile(chain: LocalChain, prompt: list[int]) -> list[dict]:
    """ms per decode step of each torch operator (self time), heaviest first, over PROFILE_STEPS steps."""
    from torch.profiler import ProfilerActivity, profile

    shard = chain.shards[0]
    shard.open_slot(0)
    token = shard.step([0], torch.tensor([prompt]))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(PROFILE_STEPS):
            token = shard.step([0], token[:, None])
    shard.free_slot(0)
    rows = [{"op": e.key, "ms_per_step": e.self_cpu_time_total / 1000 / PROFILE_STEPS,
             "calls_per_step": e.count / PROFILE_STEPS} for e in prof.key_averages()]
    rows.sort(key=lambda r: -r["ms_per_step"])
    total = sum(r["ms_per_step"] for r in rows)
    top = [{**r, "ms_per_step": round(r["ms_per_step"], 3), "share": round(r["ms_per_step"] / total, 3)}
           for r in rows[:12]]
    rest = sum(r["ms_per_step"] for r in rows[12:])
    return top + [{"op": "(all other ops)", "ms_per_step": round(rest, 3), "share": round(rest / total, 3)}]


# ------------------------------------------------------------------ llama.cpp
def llama_cpp_files(bin_dir: Path, f32: Path) -> dict[str, Path]:
    """The F32 GGUF and Q8_0/Q4_0 files quantized from it (made once, beside it)."""
    files = {"F32": f32}
    for kind in LLAMA_CPP_TYPES[1:]:
        out = f32.with_name(f32.stem.replace("f32", "").rstrip("-") + f"-{kind.lower()}.gguf")
        if not out.exists():
            subprocess.run([str(bin_dir / "llama-quantize"), str(f32), str(out), kind], check=True,
                           capture_output=True)
        files[kind] = out
    return files


def time_llama_cpp(bin_dir: Path, gguf: Path, threads: int) -> tuple[float, None]:
    """llama-bench's decode ms/token: NEW_TOKENS tokens after a PROMPT_TOKENS-token context, one repetition."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", "0", "-n", str(NEW_TOKENS),
           "-d", str(PROMPT_TOKENS), "-r", "1", "-o", "jsonl"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = [json.loads(line) for line in out.splitlines() if line.startswith("{")][-1]
    return result["avg_ns"] / 1e6 / result["n_gen"], None  # llama-bench reports wall time only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="rounds (every path once a round)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--llama-cpp", type=Path, default=None, metavar="DIR",
                        help="folder with llama.cpp's llama-bench and llama-quantize")
    parser.add_argument("--gguf", type=Path, default=None, help="F32 GGUF of the same model, for llama.cpp")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_dir = resolve_model(args.model)
    tokenizer = hf.load_tokenizer(model_dir)
    prompt = tokenizer(TEXT)["input_ids"][:PROMPT_TOKENS]
    assert len(prompt) == PROMPT_TOKENS
    reference = hf.reference_model(model_dir)
    reference.generation_config.eos_token_id = None  # always NEW_TOKENS tokens
    num_units = ModelLayout.read(model_dir).num_units
    chains = {name: LocalChain.load(model_dir, [(0, num_units)], max_slots=1, max_len=PROMPT_TOKENS + NEW_TOKENS,
                                    **kw) for name, kw in SHARD_PATHS.items()}
    runners = {"transformers float32": lambda: time_transformers(reference, prompt)}
    runners.update({name: (lambda c=chain: time_shard(c, prompt)) for name, chain in chains.items()})
    llama_skipped = None
    if args.llama_cpp and args.gguf:
        files = llama_cpp_files(args.llama_cpp, args.gguf)
        for kind, path in files.items():
            runners[f"llama.cpp {kind}"] = lambda p=path: (time_llama_cpp(args.llama_cpp, p, args.threads), None)
    else:
        llama_skipped = "pass --llama-cpp DIR and --gguf F32.gguf (see docs/runtime.md) to compare with llama.cpp"

    profiles = {name: op_profile(chains[name], prompt) for name in ("shard float32", "shard int4")}
    for run in runners.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    cpu_times: dict[str, list[float]] = {name: [] for name in runners}
    tokens: dict[str, list[int]] = {}
    names = list(runners)
    for r in range(args.runs):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: no path always first or last
        for name in order:
            (ms, cpu_ms), out = runners[name]()
            times[name].append(ms)
            if cpu_ms is not None:
                cpu_times[name].append(cpu_ms)
            if out is not None:
                tokens[name] = out
    base = statistics.median(times["shard float32"])
    cpu_base = statistics.median(cpu_times["shard float32"])
    f32_tokens = tokens["shard float32"]
    paths = {}
    for name, values in times.items():
        median = statistics.median(values)
        entry = {"ms_per_token": round(median, 2), "ratio_to_shard_float32": round(median / base, 3),
                 "runs_ms": [round(v, 2) for v in values]}
        if cpu_times[name]:
            cpu = statistics.median(cpu_times[name])
            entry.update(cpu_ms_per_token=round(cpu, 2), cpu_ratio_to_shard_float32=round(cpu / cpu_base, 3),
                         cpu_runs_ms=[round(v, 2) for v in cpu_times[name]])
        if name in chains:
            entry["weight_bytes"] = chains[name].shards[0].weight_bytes
        if name in tokens:
            entry["tokens_equal_float32"] = sum(a == b for a, b in zip(tokens[name], f32_tokens))
        paths[name] = entry
    result = {
        "model": model_dir.name, "threads": args.threads, "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": NEW_TOKENS, "runs": args.runs, "load_average": list(os.getloadavg()),
        "shard_float32_same_tokens_as_transformers": tokens["shard float32"] == tokens["transformers float32"],
        "paths": paths, "op_profile_ms_per_decode_step": profiles,
        "llama_cpp_skipped": llama_skipped,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['model']}, {args.threads} thread(s), {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens, "
          f"median of {args.runs} rounds; load average {result['load_average'][0]:.2f}")
    for name, e in paths.items():
        extra = f"  {e['weight_bytes'] / 1e6:7.1f} MB" if "weight_bytes" in e else " " * 12
        agree = f"  {e['tokens_equal_float32']}/{NEW_TOKENS} tokens as float32" if "tokens_equal_float32" in e else ""
        cpu = (f"  CPU {e['cpu_ms_per_token']:7.2f} ms x{e['cpu_ratio_to_shard_float32']:.2f}"
               if "cpu_ms_per_token" in e else " " * 21)
        print(f"  {name:22s} wall {e['ms_per_token']:7.2f} ms/token x{e['ratio_to_shard_float32']:.2f}{cpu}{extra}{agree}")
    print(f"shard float32 == transformers generate: {result['shard_float32_same_tokens_as_transformers']}")
    if llama_skipped:
        print(f"llama.cpp skipped: {llama_skipped}")
    for name, rows in profiles.items():
        print(f"per-op profile of one decode step, {name}:")
        for row in rows:
            print(f"  {row['op']:55s} {row['ms_per_step']:8.3f} ms  {100 * row['share']:5.1f}%")


if __name__ == "__main__":
    main()
