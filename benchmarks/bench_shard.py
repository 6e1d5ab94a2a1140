"""Decode ms/token of one shard holding the whole model, per weight format, beside transformers and llama.cpp.

SmolLM2-135M-Instruct (or --model, or --shape llama-1b: a Llama-3.2-1B-shaped model with
random weights, written once into the cache), one torch thread (--threads), a 32-token
prompt and 96 new tokens, greedy. In every round each path generates once, in an order that rotates
from round to round, so noise and drift land on all of them; medians are reported,
with each path's ratio to the float32 shard measured in the same rounds.

Paths: transformers' ``generate`` (float32), the shard in float32, bfloat16, int8
and int4 (``--quant``), and, when ``--llama-cpp DIR`` holds a llama.cpp build
(llama-bench, llama-quantize) and ``--gguf`` an F32 GGUF of the same model,
llama.cpp F32, Q8_0 and Q4_0 (same prompt length, new tokens and threads; its
Q8_0/Q4_0 files are made from the F32 one). Also: a per-operation profile of one
float32 and one int4 decode step (torch.profiler, ms per step), each format's
weight bytes, the bytes each path reads per token (its weights, less an embedding that is
only looked up) over its step time as an effective bandwidth, beside this machine's own
read bandwidth at the same thread count measured in the same run, and token agreement
with float32. With ``--llama-cpp`` and no ``--gguf``, an F32 GGUF of the model is written
for it (benchmarks/gguf_files.py). Each shard and transformers path
is timed on the wall clock and on its thread's CPU clock (steadier on a shared machine).

    python benchmarks/bench_shard.py [--runs 5] [--threads 1] [--shape llama-1b] [--json]
        [--llama-cpp PATH/TO/build/bin [--gguf smollm2-f32.gguf]] [--paths "shard int4,llama.cpp Q4_0"]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import gguf
import torch

from swarm.model import hf
from swarm.model.local import LocalChain, stream_generate
from swarm.model.store import cache_root, resolve_model
from swarm.model.units import ModelLayout

import gguf_files  # noqa: E402  (benchmarks/ is on sys.path when this script runs)

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
BANDWIDTH_BYTES = 1 << 30  # the buffer the machine's read bandwidth is measured on (far beyond the caches)


def read_bandwidth(threads: int, repeats: int = 5) -> float:
    """This machine's read bandwidth in bytes/s at ``threads`` threads: the median of summing a 1 GiB buffer."""
    torch.set_num_threads(threads)
    buffer = torch.ones(BANDWIDTH_BYTES // 4)
    buffer.sum()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        buffer.sum()
        times.append(time.perf_counter() - began)
    return BANDWIDTH_BYTES / statistics.median(times)


def shard_bytes_per_token(chain: LocalChain) -> int:
    """Weight bytes one decode step reads: all of them but an embedding that is only looked up
    (a tied head beside it is the same storage and is read in full)."""
    shard = chain.shards[0]
    embedding = shard.weights.embedding
    if embedding is None:
        return shard.weight_bytes
    tensors = list(embedding.tensors().values()) if hasattr(embedding, "tensors") else [embedding]
    head = {t.untyped_storage().data_ptr() for t in shard.weights.head.buffers()} if shard.weights.head else set()
    looked_up = sum(t.untyped_storage().nbytes() for t in tensors if t.untyped_storage().data_ptr() not in head)
    return shard.weight_bytes - looked_up


def gguf_bytes_per_token(path: Path) -> int:
    """The same for a GGUF file: every tensor but token_embd, unless the file has no separate output."""
    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


def f32_gguf(model_dir: Path, bin_dir: Path) -> Path:
    """An F32 GGUF of ``model_dir`` beside it, written once. A GGUF model (the default is the bundled
    Q4_1 file, inside the installed package) is dequantized by llama-quantize into the cache instead."""
    if model_dir.is_file():
        out = cache_root() / "bench" / f"{model_dir.stem}-f32.gguf"
        if not out.exists():
            print(f"writing {out} for llama.cpp (once)", file=sys.stderr, flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            partial = out.with_suffix(".partial")
            subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(model_dir), str(partial), "F32"],
                           check=True, capture_output=True)
            partial.rename(out)
        return out
    out = model_dir.with_name(model_dir.name + "-f32.gguf")
    if not out.exists():
        print(f"writing {out} for llama.cpp (once)", file=sys.stderr, flush=True)
        partial = out.with_suffix(".partial")
        gguf_files.write_f32_gguf(model_dir, partial)
        partial.rename(out)
    return out


def bench_model_dir(shape: str) -> Path:
    """A model of a public config's shape with random weights, written once into the cache (bfloat16)."""
    target = cache_root() / "bench" / f"{shape}-random-bf16"
    if not (target / "config.json").exists():
        print(f"writing a random {shape} checkpoint into {target} (once)", file=sys.stderr, flush=True)
        hf.save_random_checkpoint(target, shape, torch.bfloat16)
    return target


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
    """ms per decode step of each torch operator (self time), heaviest first, over PROFILE_STEPS steps, and the
    step's CPU time outside them (the native kernels' calls; its share is of the whole profiled step)."""
    from torch.profiler import ProfilerActivity, profile

    shard = chain.shards[0]
    shard.open_slot(0)
    token = shard.step([0], torch.tensor([prompt]))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        began = time.perf_counter()  # the profiler's times are wall times too
        for _ in range(PROFILE_STEPS):
            token = shard.step([0], token[:, None])
        step_ms = 1000 * (time.perf_counter() - began) / PROFILE_STEPS
    shard.free_slot(0)
    rows = [{"op": e.key, "ms_per_step": e.self_cpu_time_total / 1000 / PROFILE_STEPS,
             "calls_per_step": e.count / PROFILE_STEPS} for e in prof.key_averages()]
    rows.sort(key=lambda r: -r["ms_per_step"])
    total = sum(r["ms_per_step"] for r in rows)
    top = [{**r, "ms_per_step": round(r["ms_per_step"], 3), "share": round(r["ms_per_step"] / total, 3)}
           for r in rows[:12]]
    rest = sum(r["ms_per_step"] for r in rows[12:])
    # the native kernels (ctypes calls) and the Python between operators are no torch operator's self time
    outside = max(0.0, step_ms - total)
    return top + [{"op": "(all other ops)", "ms_per_step": round(rest, 3), "share": round(rest / total, 3)},
                  {"op": "(outside torch operators: native kernels, Python)", "ms_per_step": round(outside, 3),
                   "share": round(outside / step_ms, 3) if step_ms else 0.0}]


# ------------------------------------------------------------------ llama.cpp
def llama_cpp_files(bin_dir: Path, f32: Path, kinds: Sequence[str] = LLAMA_CPP_TYPES) -> dict[str, Path]:
    """The F32 GGUF and files of the other ``kinds`` quantized from it by llama-quantize (made once, beside it)."""
    files = {}
    for kind in kinds:
        out = f32 if kind == "F32" else f32.with_name(f32.stem.replace("f32", "").rstrip("-") + f"-{kind.lower()}.gguf")
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
    parser.add_argument("--gguf", type=Path, default=None,
                        help="F32 GGUF of the same model, for llama.cpp (default: written from the model)")
    parser.add_argument("--shape", choices=sorted(hf.SHAPES), default=None,
                        help="a public model's shape with random weights instead of --model")
    parser.add_argument("--paths", default=None,
                        help="comma-separated paths to run (default: all); 'shard float32' always runs")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_dir = bench_model_dir(args.shape) if args.shape else resolve_model(args.model)
    wanted = None if args.paths is None else {p.strip() for p in args.paths.split(",")} | {"shard float32"}
    if (model_dir / "tokenizer.json").exists() or (model_dir / "tokenizer_config.json").exists():
        prompt = hf.load_tokenizer(model_dir)(TEXT)["input_ids"][:PROMPT_TOKENS]
    else:  # a random checkpoint has no tokenizer: any ids will do
        prompt = list(range(100, 100 + PROMPT_TOKENS))
    assert len(prompt) == PROMPT_TOKENS
    bandwidth = read_bandwidth(args.threads)
    torch.set_num_threads(args.threads)
    num_units = ModelLayout.read(model_dir).num_units
    chains = {name: LocalChain.load(model_dir, [(0, num_units)], max_slots=1, max_len=PROMPT_TOKENS + NEW_TOKENS,
                                    **kw) for name, kw in SHARD_PATHS.items() if wanted is None or name in wanted}
    read_bytes = {name: shard_bytes_per_token(chain) for name, chain in chains.items()}
    runners = {}
    if wanted is None or "transformers float32" in wanted:
        reference = hf.reference_model(model_dir)
        reference.generation_config.eos_token_id = None  # always NEW_TOKENS tokens
        runners["transformers float32"] = lambda: time_transformers(reference, prompt)
    runners.update({name: (lambda c=chain: time_shard(c, prompt)) for name, chain in chains.items()})
    llama_skipped = None
    if args.llama_cpp:
        for kind, path in llama_cpp_files(args.llama_cpp, args.gguf or f32_gguf(model_dir, args.llama_cpp)).items():
            if wanted is None or f"llama.cpp {kind}" in wanted:
                runners[f"llama.cpp {kind}"] = lambda p=path: (time_llama_cpp(args.llama_cpp, p, args.threads), None)
                read_bytes[f"llama.cpp {kind}"] = gguf_bytes_per_token(path)
    else:
        llama_skipped = "pass --llama-cpp DIR (a llama.cpp build's bin, see docs/quantization.md) to compare with llama.cpp"

    profiles = {name: op_profile(chains[name], prompt) for name in ("shard float32", "shard int4") if name in chains}
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
        if name in read_bytes:
            entry["bytes_per_token"] = read_bytes[name]
            entry["gb_per_s"] = round(read_bytes[name] / (median / 1000) / 1e9, 2)
            entry["share_of_read_bandwidth"] = round(read_bytes[name] / (median / 1000) / bandwidth, 3)
        if name in tokens:
            entry["tokens_equal_float32"] = sum(a == b for a, b in zip(tokens[name], f32_tokens))
        paths[name] = entry
    result = {
        "model": model_dir.name, "threads": args.threads, "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": NEW_TOKENS, "runs": args.runs, "load_average": list(os.getloadavg()),
        "read_bandwidth_gb_per_s": round(bandwidth / 1e9, 2),
        "shard_float32_same_tokens_as_transformers": (tokens["shard float32"] == tokens["transformers float32"]
                                                      if "transformers float32" in tokens else None),
        "paths": paths, "op_profile_ms_per_decode_step": profiles,
        "llama_cpp_skipped": llama_skipped,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['model']}, {args.threads} thread(s), {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens, "
          f"median of {args.runs} rounds; load average {result['load_average'][0]:.2f}; "
          f"read bandwidth {result['read_bandwidth_gb_per_s']:.1f} GB/s at {args.threads} thread(s)")
    for name, e in paths.items():
        extra = f"  {e['weight_bytes'] / 1e6:7.1f} MB" if "weight_bytes" in e else " " * 12
        agree = f"  {e['tokens_equal_float32']}/{NEW_TOKENS} tokens as float32" if "tokens_equal_float32" in e else ""
        cpu = (f"  CPU {e['cpu_ms_per_token']:7.2f} ms x{e['cpu_ratio_to_shard_float32']:.2f}"
               if "cpu_ms_per_token" in e else " " * 21)
        rate = (f"  {e['gb_per_s']:5.1f} GB/s ({100 * e['share_of_read_bandwidth']:3.0f}%)"
                if "gb_per_s" in e else " " * 19)
        print(f"  {name:22s} wall {e['ms_per_token']:7.2f} ms/token x{e['ratio_to_shard_float32']:.2f}{cpu}{rate}"
              f"{extra}{agree}")
    print(f"shard float32 == transformers generate: {result['shard_float32_same_tokens_as_transformers']}")
    if llama_skipped:
        print(f"llama.cpp skipped: {llama_skipped}")
    for name, rows in profiles.items():
        print(f"per-op profile of one decode step, {name}:")
        for row in rows:
            print(f"  {row['op']:55s} {row['ms_per_step']:8.3f} ms  {100 * row['share']:5.1f}%")


if __name__ == "__main__":
    main()
