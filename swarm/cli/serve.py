"""`swarm serve`: the swarm as an OpenAI-compatible HTTP API.

Starts the source (and ``--local N`` peers), plans for the cycle objective with
enough KV slots for ``--micro-batches`` x ``--batch-size`` concurrent requests,
deploys, and serves OpenAI's API (/v1/chat/completions, /v1/completions,
/v1/models), Ollama's (/api/chat, /api/generate, /api/tags, /api/show,
/api/version), a web page at / (chat and the live swarm), /v1/swarm and /health. Concurrent requests share the pipeline's micro-batches; more wait for
a free slot. Ctrl-C stops the server and everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal

from rich.console import Console

from swarm.cli.backend import (BackendError, add_backend_arguments, resolve_model_dir, source_config,
                               source_only_pipeline)
from swarm.cli.common import add_secret_arguments, use_swarm_secret
from swarm.cli.options import speculation_from

DEFAULT_PORT = 8000
# One micro-batch per device that computes keeps each busy (No-Bubbles); more only split
# the same requests into more, smaller steps (docs/serve.md has the measurements).
DEFAULT_MICRO_BATCHES = 2
DEFAULT_BATCH_SIZE = 16  # 2 x 16 = 32 requests generate at once; more wait for a slot
DEFAULT_MAX_LEN = 1024  # per request; the KV caches hold slots x max_len positions


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve the swarm as an OpenAI-compatible HTTP API",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0: any free one; default: %(default)s)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on every /v1 and /api request "
                             "(the web page asks for it)")
    parser.add_argument("--micro-batches", type=int, default=DEFAULT_MICRO_BATCHES,
                        help="micro-batches in flight in the pipeline (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="requests per micro-batch (default: %(default)s); micro-batches x batch size "
                             "requests generate at once")
    add_backend_arguments(parser)
    add_secret_arguments(parser)
    # --max-len is per request here; --temperature, --top-p, --top-k and --seed are the
    # defaults for requests that leave them out.
    parser.set_defaults(func=run, max_len=DEFAULT_MAX_LEN)


def run(args: argparse.Namespace) -> int:
    if args.micro_batches < 1 or args.batch_size < 1:
        raise SystemExit("error: --micro-batches and --batch-size must be at least 1")
    if not args.no_swarm:
        use_swarm_secret(args)
    console = Console(highlight=False)
    try:
        asyncio.run(_serve(args, console))
    except BackendError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    console.print("stopped")
    return 0


async def _serve(args: argparse.Namespace, console: Console) -> None:
    import torch

    from swarm.model import hf
    from swarm.model.sampling import SamplingParams
    from swarm.model.stopping import stop_token_ids
    from swarm.planner.problem import InfeasibleError
    from swarm.serve.app import ApiServer, ServeConfig
    from swarm.serve.generation import no_swarm_reason
    from swarm.source import SwarmSource

    torch.set_num_threads(args.threads)
    _stop_on_signals(asyncio.current_task())
    try:
        defaults = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as exc:
        raise BackendError(str(exc)) from None
    model_dir = await asyncio.to_thread(resolve_model_dir, args, console)
    async with contextlib.AsyncExitStack() as stack:
        tokenizer = await asyncio.to_thread(hf.load_tokenizer, model_dir)
        if args.no_swarm:  # a source-only pipeline, as chat and generate run it: no discovery, no peers
            with console.status("loading the model"):
                pipeline = await stack.enter_async_context(source_only_pipeline(
                    model_dir, max_len=args.max_len, slots=args.micro_batches * args.batch_size, quant=args.quant,
                    speculation=speculation_from(args)))
            source = SourceOnly(pipeline)
            console.print(f"plan: source: units [0, {pipeline.config.plan[0].end})", style="dim", markup=False)
        else:
            config = await source_config(args, model_dir, console, stack, objective="cycle",
                                         micro_batches=args.micro_batches, batch_size=args.batch_size)
            source = await stack.enter_async_context(SwarmSource(config))
            with console.status("finding peers, measuring links, planning and loading shards..."):
                try:
                    planned = await source.deploy()
                except InfeasibleError as exc:
                    planned = None
                    console.print(f"[yellow]not serving yet:[/] "
                                  f"{no_swarm_reason(exc, len(source.state().announcements))}\n"
                                  "Requests are answered 503 until peers join.", markup=True)
            if planned is not None:
                console.print("plan: " + "; ".join(planned.describe()), style="dim", markup=False)
        serve = ServeConfig(model=model_dir.name, max_len=args.max_len, host=args.host, port=args.port,
                            api_key=args.api_key, defaults=defaults, join_command=_join_command(args))
        server = await stack.enter_async_context(ApiServer(serve, source, tokenizer, stop_token_ids(tokenizer, hf.generation_eos_ids(model_dir))))
        console.print(f"[bold]swarm serve[/] {model_dir.name}: {args.micro_batches * args.batch_size} requests at "
                      f"once, {args.max_len} tokens each", markup=True)
        console.print(f"OpenAI-compatible API at {server.url}/v1, Ollama's at {server.url}/api, "
                      f"the web page at {server.url}/ (Ctrl-C stops)", markup=False, soft_wrap=True)
        await asyncio.Event().wait()  # until Ctrl-C or SIGTERM cancels this task


class SourceOnly:
    """`serve --no-swarm`: the source-only pipeline (every unit in this process) behind the part
    of a SwarmSource the HTTP API reads: open_session, state(), model_dir and config."""

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline
        self.config = pipeline.config  # .quant, .dtype for /api/show
        self.model_dir = pipeline.config.model_dir

    async def open_session(self, sampling, *, speculate=None):
        return await self.pipeline.open_session(sampling, speculate=speculate)

    def state(self):
        from swarm.source_state import SourceState

        return SourceState(source_id="source", source_name="source", source_profile={}, source_mem=0,
                           micro_batches=self.pipeline.micro_batches_in_flight, model=self.model_dir.name,
                           deployed=True, diagnostic="--no-swarm: this process alone, no discovery")


def _join_command(args: argparse.Namespace) -> str | None:
    """What another device runs to join this swarm (the web page shows it); None with --no-swarm."""
    from swarm import secret

    if args.no_swarm:
        return None
    current = secret.current()
    return "swarm join --insecure" if current is None else f"swarm join --join-code {current.join_code}"


def _stop_on_signals(main: asyncio.Task) -> None:
    """Ctrl-C or SIGTERM: unwind (the server, the source, the local peers); a second one: exit now.

    Installed explicitly: a process started in the background of a script has SIGINT
    ignored, and asyncio.run would then leave Ctrl-C to nobody."""
    signals = [0]

    def on_signal() -> None:
        signals[0] += 1
        if signals[0] > 1:
            os._exit(130)  # the local peers die with this process (PR_SET_PDEATHSIG)
        main.cancel()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
