"""`swarm generate`: complete one or more prompts.

Every way runs the same Pipeline and Session path as chat and serve. Without swarm
options (or with ``--no-swarm``) it is a source-only pipeline: the whole model in
this process, on ``--device``. With ``--local N`` it starts N peers on this machine;
with ``--interface`` and/or ``--peer`` it plans over the peers it finds there
(this device keeps the first unit: the prompt's tokens never leave it).
Several ``--prompt`` run as one batch (through the pipeline, several micro-batches
in flight, planned for the cycle objective). The prompt is used as given unless
``--chat`` wraps it in the model's chat template.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from rich.console import Console

from swarm.cli.backend import BackendError, add_backend_arguments, report_start, source_config
from swarm.cli.common import add_secret_arguments, check_device, resolve_model_or_exit, use_swarm_secret
from swarm.cli.options import add_device_options, dtype_from, speculation_from

DEFAULT_MAX_NEW_TOKENS = 64
MAX_MICRO_BATCHES = 4


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="generate a completion for one or more prompts",
                                   description=__doc__)
    parser.add_argument("--prompt", action="append", default=None,
                        help="a prompt (repeat for a batch; default: read one from standard input)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: token ids, text, the plan and timings")
    add_device_options(parser, where="in this process: ")
    add_backend_arguments(parser)
    add_secret_arguments(parser)
    # The KV cache is sized from the prompts unless --max-len asks for more.
    parser.set_defaults(func=run, max_len=None)


@dataclass
class Outcome:
    """What a backend produced: tokens per prompt and when they arrived."""

    token_ids: list[list[int]]
    first_token_s: float
    total_s: float
    plan: list[dict] = field(default_factory=list)
    mode: str = "single-process"
    predicted: dict = field(default_factory=dict)  # the planner's figures for the plan
    speculation: dict = field(default_factory=dict)  # drafts verified and accepted (--speculate)


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt:
        return args.prompt
    if sys.stdin.isatty():
        print("reading the prompt from standard input (end with Ctrl-D)...", file=sys.stderr)
    text = sys.stdin.read()
    if not text.strip():
        raise SystemExit("error: no prompt: pass --prompt TEXT or pipe one on standard input")
    return [text.rstrip("\n")]


def run(args: argparse.Namespace) -> int:
    import torch

    from swarm.model import hf
    from swarm.model.sampling import SamplingParams
    from swarm.model.stopping import stop_token_ids

    if args.max_new_tokens < 1:
        raise SystemExit("error: --max-new-tokens must be at least 1")
    try:
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    torch.set_num_threads(args.threads)
    check_device(args.device)
    console = Console(stderr=True, highlight=False)
    texts = read_prompts(args)
    model_dir = resolve_model_or_exit(args.model, console)
    tokenizer = hf.load_tokenizer(model_dir)
    if args.chat:
        prompts = [hf.chat_token_ids(tokenizer, [{"role": "user", "content": t}]) for t in texts]
    else:
        prompts = [tokenizer(t)["input_ids"] for t in texts]
    stop_ids = sorted(stop_token_ids(tokenizer, hf.generation_eos_ids(model_dir)))
    stream = None if args.json or len(prompts) > 1 else TextStream(tokenizer)
    args.max_len = args.max_len or max(map(len, prompts)) + args.max_new_tokens
    if uses_swarm(args):
        use_swarm_secret(args)
    where = generate_over_swarm if uses_swarm(args) else generate_here
    try:
        outcome = asyncio.run(where(args, model_dir, prompts, sampling, stop_ids, stream, console))
    except BackendError as err:
        raise SystemExit(f"error: {err}") from None
    if stream:
        stream.finish()
    report(args, tokenizer, prompts, outcome)
    return 0


def uses_swarm(args: argparse.Namespace) -> bool:
    """A one-shot command runs in this process unless told where a swarm is."""
    return not args.no_swarm and bool(args.local or args.interface or args.peer)


class TextStream:
    """Prints a single answer as it grows, decoding the whole answer so multi-token characters come out right."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def push(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.startswith(self.shown) and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text

    def finish(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()


async def run_prompts(generate: Callable[..., AsyncIterator[int]], prompts: list[list[int]], max_new_tokens: int,
                      sampling, stop_ids, stream: TextStream | None) -> tuple[list[list[int]], float, float]:
    """Every prompt through ``generate`` (``Pipeline.generate`` or ``SwarmSource.generate``), all
    admitted at once, prompt i sampled with ``row_sampling(sampling, i)``: (tokens per prompt,
    seconds to the first token, seconds in all)."""
    from swarm.model.sampling import row_sampling

    out: list[list[int]] = [[] for _ in prompts]
    began = time.perf_counter()
    first: list[float] = []

    async def one(row: int, prompt: list[int]) -> None:
        async for token in generate(prompt, max_new_tokens, row_sampling(sampling, row), stop_ids):
            first.append(first[0] if first else time.perf_counter() - began)
            out[row].append(token)
            if stream:
                stream.push(token)

    async with asyncio.TaskGroup() as tasks:
        for row, prompt in enumerate(prompts):
            tasks.create_task(one(row, prompt))
    return out, first[0] if first else 0.0, time.perf_counter() - began


async def generate_here(args, model_dir, prompts, sampling, stop_ids, stream, console) -> Outcome:
    """No swarm: a source-only pipeline, the whole model in this process (its stage loaded on --device)."""
    from swarm.cli.backend import source_only_pipeline
    from swarm.model.shard import Shard
    from swarm.model.units import ModelLayout

    units, dtype = ModelLayout.read(model_dir).num_units, dtype_from(args)
    async with contextlib.AsyncExitStack() as stack:
        with console.status("loading the model..."):
            shard = await asyncio.to_thread(lambda: Shard.load(model_dir, 0, units, max_slots=len(prompts),
                                                               max_len=args.max_len, dtype=dtype, device=args.device,
                                                               quant=args.quant))
            pipeline = await stack.enter_async_context(await asyncio.to_thread(
                source_only_pipeline, model_dir, max_len=args.max_len, slots=len(prompts), dtype=dtype,
                quant=args.quant, first_shard=shard, speculation=speculation_from(args)))
        out, first, total = await run_prompts(pipeline.generate, prompts, args.max_new_tokens, sampling, stop_ids,
                                              stream)
        drafts = dataclasses.asdict(pipeline.speculation)
    return Outcome(out, first, total, [{"device": "this process", "start": 0, "end": units}], speculation=drafts)


def workload(prompts: int) -> tuple[str, int, int]:
    """(objective, micro-batches, sequences per micro-batch) for a batch of prompts.

    One prompt is interactive: the latency plan. A batch keeps up to
    MAX_MICRO_BATCHES micro-batches in flight so no stage waits (No-Bubbles) and
    is planned for the cycle objective, max(R/m, P)."""
    if prompts == 1:
        return "latency", 1, 1
    micro_batches = min(prompts, MAX_MICRO_BATCHES)
    return "cycle", micro_batches, math.ceil(prompts / micro_batches)


async def generate_over_swarm(args, model_dir, prompts, sampling, stop_ids, stream, console) -> Outcome:
    from swarm.source import SwarmSource

    objective, micro_batches, batch_size = workload(len(prompts))
    async with contextlib.AsyncExitStack() as stack:
        config = await source_config(args, model_dir, console, stack, objective=objective,
                                     micro_batches=micro_batches, batch_size=batch_size)
        source = await stack.enter_async_context(SwarmSource(config))
        with console.status("finding peers, measuring links, planning and loading shards...") as status:
            async with asyncio.TaskGroup() as tasks:
                watcher = tasks.create_task(report_start(source, status))  # weights moving: bytes, rate, time left
                try:
                    planned = await source.deploy()
                finally:
                    watcher.cancel()
        names = [d["name"] for d in planned.problem["devices"]]
        plan = [{"device": names[s.device], "start": s.start, "end": s.end} for s in planned.plan.stages]
        console.print("plan: " + ", ".join(f"{p['device']} [{p['start']}, {p['end']})" for p in plan), style="dim")
        out, first, total = await run_prompts(source.generate, prompts, args.max_new_tokens, sampling, stop_ids,
                                              stream)
        predicted = predicted_figures(planned, max(map(len, prompts)))
        mode = f"swarm ({objective}, {micro_batches} x {batch_size} in flight)"
        return Outcome(out, first, total, plan, mode, predicted, dataclasses.asdict(source.speculation))


def predicted_figures(planned, prompt_tokens: int) -> dict:
    """What the planner predicted for the deployed plan, in the units of ``timings``: a decode
    step (every sequence one token) is ``inflight`` micro-batch steps of the cycle time, so
    max(R, inflight x P); the first token pays the prompt's prefill instead (issue 26)."""
    from swarm.discovery.problem import predicted_first_token_s

    p = planned.plan
    return {
        "latency_s": p.latency_s, "bottleneck_s": p.bottleneck_s,
        "ms_per_token": round(1e3 * p.inflight * p.cycle_s, 2),
        "time_to_first_token_s": round(predicted_first_token_s(planned.problem, p.stages, prompt_tokens), 4),
        "compute_ms_per_token": round(1e3 * sum(p.compute_s), 2),
        "overhead_ms_per_token": round(1e3 * sum(p.overhead_s), 2),  # step constants and hop overheads
        "hops_ms_per_token": round(1e3 * sum(p.hop_s), 2),
    }


def report(args, tokenizer, prompts, outcome: Outcome) -> None:
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in outcome.token_ids]
    decode_tokens = sum(max(len(ids) - 1, 0) for ids in outcome.token_ids)
    decode_steps = max((len(ids) for ids in outcome.token_ids), default=1) - 1
    timings = {
        "time_to_first_token_s": round(outcome.first_token_s, 4),
        "total_s": round(outcome.total_s, 4),
        # per decode step after the first token (what a person waits per token)
        "ms_per_token": round(1000 * (outcome.total_s - outcome.first_token_s) / max(decode_steps, 1), 2),
        "tokens_per_s": round(decode_tokens / max(outcome.total_s - outcome.first_token_s, 1e-9), 2),
    }
    if args.json:
        results = [{"token_ids": ids, "text": text, "prompt_tokens": len(p)}
                   for ids, text, p in zip(outcome.token_ids, texts, prompts)]
        body = {**results[0], "results": results, "mode": outcome.mode, "plan": outcome.plan,
                "predicted": outcome.predicted, "timings": timings, "speculation": outcome.speculation}
        print(json.dumps(body))
        return
    if len(prompts) > 1:
        for i, text in enumerate(texts):
            print(f"--- {i}: {args.prompt[i]!r}\n{text}")
