"""Where the model runs, chosen from the command line (shared by `swarm chat`, `swarm top`, `swarm generate`).

``--no-swarm``: this process alone. ``--local N``: N peers started on this machine
(loopback only). Otherwise the peers announced on the network (``--interface``,
``--peer``), this device holding the first unit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Awaitable, Callable
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from swarm.cli.common import resolve_model_with_status
from swarm.cli.options import (add_memory_option, add_model_option, add_network_options, add_quant_option,
                              add_speculate_options, add_threads_option, interfaces_from, speculation_from)
from swarm.model.stopping import stop_token_ids
from swarm.view.snapshot import PeerState, PlanState, StageState, SwarmSnapshot

if TYPE_CHECKING:
    from swarm.model.shard import Shard
    from swarm.runtime.engine import Pipeline
    from swarm.runtime.recovery import RecoveryEvent
    from swarm.runtime.session import Session

STATUS_REFRESH_S = 0.2
STATS_POLL_S = 0.5


class BackendError(RuntimeError):
    """Something a person can act on: no peers, not enough memory, a lost peer."""


class TokenRate:
    """Tokens per second over the last few tokens; None when idle (the chat's and views' figure)."""

    WINDOW = 32
    IDLE_S = 2.0

    def __init__(self) -> None:
        self._times: list[float] = []

    def tick(self) -> None:
        self._times = self._times[-(self.WINDOW - 1):] + [time.perf_counter()]

    def value(self) -> float | None:
        t = self._times
        if len(t) < 2 or time.perf_counter() - t[-1] > self.IDLE_S:
            return None
        return (len(t) - 1) / (t[-1] - t[0])


@dataclass
class Backend:
    """Where the model runs: sequences to open, and what the view shows of it."""

    open_session: Callable[[], Awaitable["Session"]]
    tokenizer: Any
    model_name: str
    snapshot: Callable[[], SwarmSnapshot]
    recoveries: Callable[[], tuple["RecoveryEvent", ...]]
    rate: TokenRate
    stop_ids: frozenset[int]  # stopping.stop_token_ids of the model: where every answer ends


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_option(parser)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--local", type=int, metavar="N", default=None,
                       help="start N peers on this machine (loopback only) and split the model across them")
    where.add_argument("--no-swarm", action="store_true", help="run the whole model in this process")
    add_network_options(parser)
    add_threads_option(parser, who="this process and each local peer")
    add_quant_option(parser)  # the swarm's weights: only peers joined with the same --quant take part
    parser.add_argument("--max-len", type=int, default=2048, help="longest conversation in tokens (KV cache size)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    add_speculate_options(parser)
    add_memory_option(parser, help="memory this device offers to the plan (e.g. 200M): less makes the swarm "
                                   "take more")
    # Extra `swarm join` options for --local peers (tests shorten heartbeats with it).
    parser.add_argument("--local-peer-arg", dest="local_peer_args", action="append", help=argparse.SUPPRESS)


def history_path() -> Path:
    from swarm.model.store import cache_root

    path = cache_root() / "chat_history"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def resolve_model_dir(args: argparse.Namespace, console: Console) -> Path:
    from swarm.model.store import ModelNotFoundError

    try:
        return resolve_model_with_status(args.model, console)
    except ModelNotFoundError as exc:
        raise BackendError(str(exc)) from None


@contextlib.asynccontextmanager
async def open_backend(args: argparse.Namespace, console: Console):
    """The model running where the command line says: this process, or the swarm."""
    import torch

    torch.set_num_threads(args.threads)
    model_dir = await asyncio.to_thread(resolve_model_dir, args, console)
    async with contextlib.AsyncExitStack() as stack:
        if args.no_swarm:
            yield await _single_process(args, model_dir, console, stack)
        else:
            yield await _swarm(args, model_dir, console, stack)


def _progress(console: Console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[what]}"), TimeElapsedColumn(), console=console, transient=True)


async def source_config(args: argparse.Namespace, model_dir: Path, console: Console,
                        stack: contextlib.AsyncExitStack, *, objective: str = "latency",
                        micro_batches: int = 1, batch_size: int = 1):
    """Start local peers if asked (stopped when ``stack`` closes), profile this device
    (progress bars), and return the SourceConfig for a SwarmSource.

    The workload (``micro_batches`` x ``batch_size`` sequences of ``args.max_len``
    tokens) sizes the KV caches the plan must fit, and local peers' budgets."""
    import socket

    from swarm.localswarm import LocalSwarm, LocalSwarmError
    from swarm.model.profile import profile_device
    from swarm.model.store import cache_root
    from swarm.source import SourceConfig

    local_settings: dict = {}
    if args.local:
        with _progress(console) as progress:
            task = progress.add_task(f"starting {args.local} local peers", total=args.local, what="")
            local = LocalSwarm.for_model(
                model_dir, args.local, slots=micro_batches * batch_size, max_len=args.max_len, threads=args.threads,
                log_dir=cache_root() / "local-peers", quant=args.quant,
                extra_args=args.local_peer_args or (),
                on_ready=lambda done, total, name: progress.update(task, completed=done, what=name))
            try:
                await stack.enter_async_context(local)
            except LocalSwarmError as exc:
                raise BackendError(str(exc)) from None
        local_settings = local.source_settings()
        local_settings["seeds"] += tuple(args.peer)
    with _progress(console) as progress:
        task = progress.add_task("profiling this device", total=None, what="")
        profile = (await asyncio.to_thread(
            profile_device, model_dir, threads=args.threads, quant=args.quant,
            on_unit=lambda i, n, name: progress.update(task, completed=i, total=n, what=name))).to_json()
    settings = {"interfaces": interfaces_from(args), "seeds": tuple(args.peer), "mdns": args.mdns, **local_settings}
    if args.mem is not None:
        settings["mem_bytes"] = args.mem
    settings["speculate"], settings["speculate_model"] = speculation_from(args)
    return SourceConfig(model=model_dir, name=socket.gethostname(), threads=args.threads, profile=profile,
                        max_len=args.max_len, quant=args.quant, objective=objective, micro_batches=micro_batches,
                        batch_size=batch_size, **settings)


async def _swarm(args: argparse.Namespace, model_dir: Path, console: Console,
                 stack: contextlib.AsyncExitStack) -> Backend:
    """Plan and deploy over the swarm; each conversation is a pipeline session."""
    from swarm.model import hf
    from swarm.model.sampling import SamplingParams
    from swarm.planner.problem import InfeasibleError
    from swarm.source import SwarmSource, not_enough_memory
    from swarm.view.from_source import snapshot_from_source

    config = await source_config(args, model_dir, console, stack)
    source = await stack.enter_async_context(SwarmSource(config))
    with console.status("looking for peers") as status:
        async with asyncio.TaskGroup() as tasks:
            watcher = tasks.create_task(report_start(source, status))
            try:
                await source.deploy()
            except InfeasibleError as exc:
                state = source.state()
                raise BackendError(not_enough_memory(exc, len(state.announcements), state.diagnostic)) from None
            finally:
                watcher.cancel()
    state = source.state()
    if not state.announcements:
        console.print(f"[yellow]no peers found:[/] {state.diagnostic}\n"
                      "The whole model runs on this device. Run `swarm join` on another device to add it, "
                      "or `swarm chat --local 2` to start peers here.", markup=True)
    tokenizer = await asyncio.to_thread(hf.load_tokenizer, model_dir)
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    rate = TokenRate()

    async def open_session():
        try:
            return await source.open_session(sampling)
        except InfeasibleError as exc:  # after a loss the swarm could not recover from
            state = source.state()
            raise BackendError(not_enough_memory(exc, len(state.announcements), state.diagnostic)) from None

    return Backend(open_session, tokenizer, model_dir.name,
                   lambda: snapshot_from_source(dataclasses.replace(source.state(), tokens_per_s=rate.value())),
                   lambda: source.state().recoveries, rate, stop_token_ids(tokenizer, hf.generation_eos_ids(model_dir)))


async def report_start(source, status) -> None:
    """Keep the spinner's text on what the source is doing while it gathers and deploys
    (and, while peers receive their weights from here, on their bytes, rate and time left)."""
    from swarm.sizes import describe_transfer as describe

    while True:
        state = source.state()
        text = (f"{len(state.announcements)} peer(s) live, {state.links_measured} link(s) from here measured; "
                "planning and loading shards when every link is measured")
        if state.plan is not None:
            counters = await source.peer_counters(timeout=STATUS_REFRESH_S)
            moving = [(state.announcements[pid].name, c["transfer"]) for pid, c in sorted(counters.items())
                      if c.get("transfer") and pid in state.announcements]
            if moving:
                text = "loading shards; receiving weights: " + "; ".join(
                    f"{name} {describe(t['done'], t['total'], t['rate_bps'])}" for name, t in moving)
        status.update(text)
        await asyncio.sleep(STATUS_REFRESH_S)


def source_only_pipeline(model_dir: Path, *, max_len: int, slots: int = 1, dtype: str = "float32",
                         quant: str | None = None, first_shard: "Shard | None" = None,
                         speculation: tuple[str, str | None] = ("off", None)) -> "Pipeline":
    """``--no-swarm``: a pipeline whose one stage is this process (every unit, no discovery, no
    peers); the same Pipeline and Session path as over a swarm. ``first_shard``: that stage,
    loaded by the caller (on its --device). ``speculation``: ``options.speculation_from``'s."""
    from swarm.model.draft import load_drafter
    from swarm.model.units import ModelLayout
    from swarm.runtime.deploy import StagePlacement
    from swarm.runtime.engine import Pipeline, PipelineConfig
    from swarm.runtime.schedule import Layout
    from swarm.runtime.speculate import Speculation

    plan = (StagePlacement(None, 0, ModelLayout.read(model_dir).num_units),)
    mode, draft_model = Speculation(speculation[0]), speculation[1]
    config = PipelineConfig(model_dir, plan, layout=Layout(1, slots), max_len=max_len, dtype=dtype, quant=quant,
                            speculate=mode)
    drafter = None if draft_model is None else load_drafter(draft_model, model_dir, slots=slots, max_len=max_len)
    return Pipeline(config, first_shard=first_shard, drafter=drafter)


async def _single_process(args: argparse.Namespace, model_dir: Path, console: Console,
                          stack: contextlib.AsyncExitStack) -> Backend:
    """A source-only pipeline: this process holds every unit (no discovery, no peers)."""
    from swarm.model import hf
    from swarm.model.sampling import SamplingParams

    with console.status("loading the model"):
        pipeline = await stack.enter_async_context(await asyncio.to_thread(
            source_only_pipeline, model_dir, max_len=args.max_len, quant=args.quant,
            speculation=speculation_from(args)))
    units = pipeline.config.plan[0].end
    tokenizer = await asyncio.to_thread(hf.load_tokenizer, model_dir)
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    rate = TokenRate()
    stats: list = []

    async def poll_stats() -> None:
        while True:
            await asyncio.sleep(STATS_POLL_S)
            stats[:] = await pipeline.stage_stats()

    tasks = await stack.enter_async_context(asyncio.TaskGroup())
    poller = tasks.create_task(poll_stats())
    stack.callback(poller.cancel)  # runs before the TaskGroup waits for it

    def snapshot() -> SwarmSnapshot:
        return single_process_snapshot(model_dir.name, units, pipeline, stats, rate.value())

    return Backend(lambda: pipeline.open_session(sampling), tokenizer, model_dir.name, snapshot, lambda: (), rate,
                   stop_token_ids(tokenizer, hf.generation_eos_ids(model_dir)))


def single_process_snapshot(model: str, units: int, pipeline, stats, tokens_per_s: float | None) -> SwarmSnapshot:
    """This process as the only peer and its one stage."""
    import psutil
    import torch

    dep = pipeline.deployment
    used = sum(r.weight_bytes + r.kv_bytes for r in dep.ready) if dep is not None else 0
    stat = stats[0] if stats else None
    stage = StageState("this process", 0, units, busy_share=stat.busy_share if stat else None,
                       tokens_per_s=tokens_per_s, in_flight=None,
                       step_ms=1e3 * stat.busy_share / stat.steps_per_s if stat and stat.steps_per_s else None)
    peer = PeerState("this process", mem_used=used, mem_usable=used + psutil.virtual_memory().available,
                     threads=torch.get_num_threads(), last_seen_s=0.0)
    return SwarmSnapshot(peers=(peer,), source="this process", tokens_per_s=tokens_per_s,
                         plan=PlanState(model, units, (stage,), objective="single process"))
