"""Where the model runs, chosen from the command line (shared by `swarm chat`, `swarm top`, `swarm generate`).

``--no-swarm``: this process alone. ``--local N``: N peers started on this machine
(loopback only). Otherwise the peers announced on the network (``--interface``,
``--peer``), this device holding the first unit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from swarm.chat.engines import BackendError, SourceView, SwarmEngine
from swarm.cli.common import resolve_model_with_status
from swarm.cli.options import (add_memory_option, add_model_option, add_network_options, add_threads_option,
                              interfaces_from)
from swarm.view.snapshot import SwarmSnapshot

if TYPE_CHECKING:
    from swarm.chat.conversation import TokenEngine

STATUS_REFRESH_S = 0.2


@dataclass
class Backend:
    engine: "TokenEngine"
    tokenizer: Any
    model_name: str
    snapshot: Callable[[], SwarmSnapshot]


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_option(parser)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--local", type=int, metavar="N", default=None,
                       help="start N peers on this machine (loopback only) and split the model across them")
    where.add_argument("--no-swarm", action="store_true", help="run the whole model in this process")
    add_network_options(parser)
    add_threads_option(parser, who="this process and each local peer")
    parser.add_argument("--max-len", type=int, default=2048, help="longest conversation in tokens (KV cache size)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
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
    if args.no_swarm:
        yield await _single_process(args, model_dir, console)
        return
    async with contextlib.AsyncExitStack() as stack:
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
                log_dir=cache_root() / "local-peers",
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
            profile_device, model_dir, threads=args.threads,
            on_unit=lambda i, n, name: progress.update(task, completed=i, total=n, what=name))).to_json()
    settings = {"interfaces": interfaces_from(args), "seeds": tuple(args.peer), "mdns": args.mdns, **local_settings}
    if args.mem is not None:
        settings["mem_bytes"] = args.mem
    return SourceConfig(model=model_dir, name=socket.gethostname(), threads=args.threads, profile=profile,
                        max_len=args.max_len, objective=objective, micro_batches=micro_batches,
                        batch_size=batch_size, **settings)


async def _swarm(args: argparse.Namespace, model_dir: Path, console: Console,
                 stack: contextlib.AsyncExitStack) -> Backend:
    """Plan and deploy over the swarm; the chat's engine is a pipeline session."""
    from swarm.model import hf
    from swarm.model.sampling import SamplingParams

    config = await source_config(args, model_dir, console, stack)
    engine = SwarmEngine(config, SamplingParams(args.temperature, args.top_k, args.top_p, args.seed))
    stack.push_async_callback(engine.aclose)
    with console.status("looking for peers") as status:
        async with asyncio.TaskGroup() as tasks:
            watcher = tasks.create_task(_report_start(engine, status))
            try:
                await engine.start()
            finally:
                watcher.cancel()
    if not engine.source.directory.live:
        console.print(f"[yellow]no peers found:[/] {engine.source.directory.diagnostic()}\n"
                      "The whole model runs on this device. Run `swarm join` on another device to add it, "
                      "or `swarm chat --local 2` to start peers here.", markup=True)
    tokenizer = await asyncio.to_thread(hf.load_tokenizer, model_dir)
    view = SourceView(engine, model_dir.name)
    tasks = await stack.enter_async_context(asyncio.TaskGroup())
    poller = tasks.create_task(view.poll_forever())
    stack.callback(poller.cancel)  # runs before the TaskGroup waits for it
    return Backend(engine, tokenizer, model_dir.name, view.snapshot)


async def _report_start(engine: "SwarmEngine", status) -> None:
    """Keep the spinner's text on what the source is doing while it gathers and deploys."""
    while True:
        source = engine.source
        if source is not None and source.directory is not None and source.prober is not None:
            live, links = len(source.directory.live), len(source.prober.links)
            status.update(f"{live} peer(s) live, {links} link(s) from here measured; "
                          "planning and loading shards when every link is measured")
        await asyncio.sleep(STATUS_REFRESH_S)


async def _single_process(args: argparse.Namespace, model_dir: Path, console: Console) -> Backend:
    from rich.progress import Progress

    from swarm.chat.engines import ChainEngine
    from swarm.model import hf
    from swarm.model.local import LocalChain
    from swarm.model.sampling import SamplingParams
    from swarm.model.shard import Shard
    from swarm.model.units import ModelLayout

    layout = ModelLayout.read(model_dir)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("loading the model", total=1)
        shard = await asyncio.to_thread(Shard.load, model_dir, 0, layout.num_units, max_len=args.max_len)
        progress.advance(task)
    tokenizer = await asyncio.to_thread(hf.load_tokenizer, model_dir)
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    engine = ChainEngine(LocalChain([shard]), sampling)
    name = model_dir.name
    return Backend(engine, tokenizer, name, lambda: engine.snapshot(name))
