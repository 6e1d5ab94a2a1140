"""`swarm chat`: an interactive chat with a model split across the swarm.

Tokens stream as they are generated; earlier turns stay in the KV cache. Ctrl-C
stops the current answer (twice: leaves at once), Ctrl-D or /quit leaves cleanly
and stops whatever the chat started (``--local N`` peers included).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prompt_toolkit import PromptSession
from prompt_toolkit.history import FileHistory, InMemoryHistory
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from swarm.view.conversation import DEFAULT_MAX_NEW_TOKENS, ContextFull, Conversation
from swarm.view.live import refresh_forever
from swarm.view.render import links_table, peers_table, plan_view, topology
from swarm.view.snapshot import SwarmSnapshot

if TYPE_CHECKING:
    from swarm.view.conversation import TokenEngine

log = logging.getLogger(__name__)

HELP = """\
/peers   the peers in the swarm: memory, compute, liveness, links
/plan    how the model's layers are laid out across the peers
/view    show or hide the live topology panel while answering
/reset   forget the conversation (and its cache)
/help    this list
/quit    leave (Ctrl-D too); Ctrl-C stops an answer"""
PROMPT = "you> "
VIEW_REFRESH_S = 0.25
STATUS_REFRESH_S = 0.2


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help="chat with a model split across the swarm", description=__doc__)
    add_backend_arguments(parser)
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--view", action="store_true", help="start with the topology panel shown")
    parser.add_argument("--no-history-file", action="store_true", help="keep input history in memory only")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = Console(highlight=False)
    try:
        return asyncio.run(_chat(args, console))
    except BackendError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        return 1
    except asyncio.CancelledError:  # a second Ctrl-C during an answer; everything was stopped
        console.print("interrupted")
        return 130


@dataclass
class ChatState:
    view: bool
    snapshot: Callable[[], SwarmSnapshot]


async def _chat(args: argparse.Namespace, console: Console) -> int:
    async with open_backend(args, console) as backend:
        conversation = Conversation(backend.engine, backend.tokenizer, system=args.system,
                                    max_new_tokens=args.max_new_tokens)
        await conversation.reset()
        state = ChatState(view=args.view, snapshot=backend.snapshot)
        history = InMemoryHistory() if args.no_history_file else FileHistory(str(history_path()))
        prompt = PromptSession(history=history)
        console.print(f"[bold]swarm chat[/] with {backend.model_name} — /help for commands, Ctrl-D to leave")
        while True:
            try:
                line = (await prompt.prompt_async(PROMPT)).strip()
            except KeyboardInterrupt:
                continue  # like any REPL: Ctrl-C at the prompt clears the line
            except EOFError:
                break
            if not line:
                continue
            if line.startswith("/"):
                if not await _command(line, conversation, state, console):
                    break
                continue
            await _answer(line, conversation, state, console)
    console.print("bye")
    return 0


async def _command(line: str, conversation: Conversation, state: ChatState, console: Console) -> bool:
    """Run a slash command; False means leave."""
    name = line.split()[0].lower()
    if name in ("/quit", "/exit"):
        return False
    if name == "/help":
        console.print(HELP)
    elif name == "/peers":
        snapshot = state.snapshot()
        console.print(peers_table(snapshot))
        if snapshot.links:
            console.print(links_table(snapshot))
    elif name == "/plan":
        console.print(plan_view(state.snapshot().plan))
    elif name == "/view":
        state.view = not state.view
        console.print(f"topology panel {'on' if state.view else 'off'}")
        if state.view:
            console.print(topology(state.snapshot()))
    elif name == "/reset":
        await conversation.reset()
        console.print("conversation cleared")
    else:
        console.print(f"unknown command {name}; /help lists them")
    return True


async def _answer(text: str, conversation: Conversation, state: ChatState, console: Console) -> None:
    """Stream one answer; the first Ctrl-C stops it, a second one leaves at once."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    me = asyncio.current_task()

    def on_sigint() -> None:
        if stop.is_set():
            me.cancel()  # second Ctrl-C: unwind now; `async with` still stops the local swarm
        stop.set()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    began = time.perf_counter()
    first_token_s: float | None = None
    pieces: list[str] = []
    try:
        async with _answer_display(state, console, pieces):
            async for piece in conversation.ask(text, stop):
                if first_token_s is None:
                    first_token_s = time.perf_counter() - began
                pieces.append(piece)
                if not state.view:
                    console.print(piece, end="", markup=False, soft_wrap=True)
                    console.file.flush()
    except BackendError as exc:
        console.print(f"\n[bold red]error:[/] {exc}")
        return
    except ContextFull as exc:
        console.print(f"\n[bold red]error:[/] the conversation is too long for the cache ({exc}); "
                      "/reset starts a new one, --max-len makes the cache longer")
        return
    except Exception as exc:  # the chat outlives a failed answer; the next question starts afresh
        log.debug("answer failed", exc_info=True)
        console.print(f"\n[bold red]error:[/] {type(exc).__name__}: {exc} (run with -vv for details)")
        return
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    if state.view:
        console.print("".join(pieces), markup=False, soft_wrap=True, end="")
    console.print()
    turn = conversation.last_turn
    if turn is not None:
        elapsed = time.perf_counter() - began
        per_token = (elapsed - (first_token_s or 0)) / max(turn.generated - 1, 1) * 1e3
        status = " [stopped]" if turn.stopped else ""
        console.print(Text(
            f"[{turn.generated} tokens, first after {1e3 * (first_token_s or 0):.0f} ms, "
            f"{per_token:.1f} ms/token, prefilled {turn.prefilled}"
            f"{' (recomputed the conversation)' if turn.recomputed else ''}]{status}",
            style="dim"))


@contextlib.asynccontextmanager
async def _answer_display(state: ChatState, console: Console, pieces: list[str]):
    """With the view on: a transient Live of the answer so far above the topology panel."""
    if not state.view:
        yield
        return

    def render(snapshot: SwarmSnapshot):
        return Group(Text("".join(pieces)), topology(snapshot, compact=True))

    with Live(console=console, auto_refresh=False, transient=True, vertical_overflow="crop") as live:
        async with asyncio.TaskGroup() as tasks:
            refresher = tasks.create_task(refresh_forever(live, state.snapshot, render, VIEW_REFRESH_S))
            try:
                yield
            finally:
                refresher.cancel()


# ---------------------------------------------------------------- backends
# Shared with `swarm top`: where the model runs, chosen from the command line.


class BackendError(RuntimeError):
    """Something a person can act on: no peers, not enough memory, a lost peer."""


@dataclass
class Backend:
    engine: "TokenEngine"
    tokenizer: Any
    model_name: str
    snapshot: Callable[[], SwarmSnapshot]


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="Hugging Face model folder (default: SmolLM2-135M-Instruct)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--local", type=int, metavar="N", default=None,
                       help="start N peers on this machine (loopback only) and split the model across them")
    where.add_argument("--no-swarm", action="store_true", help="run the whole model in this process")
    parser.add_argument("--interface", action="append", default=None, metavar="IP",
                        help="interface address for discovery (repeatable; default: every interface)")
    parser.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                        help="a peer to ask directly, for networks that block multicast")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for this process (and each local peer)")
    parser.add_argument("--max-len", type=int, default=2048, help="longest conversation in tokens (KV cache size)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    # Extra `swarm join` options for --local peers (tests shorten heartbeats with it).
    parser.add_argument("--local-peer-arg", dest="local_peer_args", action="append", help=argparse.SUPPRESS)


def history_path() -> Path:
    from swarm.model.store import cache_root

    path = cache_root() / "chat_history"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def resolve_model_dir(args: argparse.Namespace, console: Console) -> Path:
    from swarm.model.store import ModelNotFoundError, resolve_model

    with console.status("finding the model") as status:
        try:
            return resolve_model(args.model, lambda stage: status.update(f"default model: {stage}"))
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
                        stack: contextlib.AsyncExitStack):
    """Start local peers if asked (stopped when ``stack`` closes), profile this device
    (progress bars), and return the SourceConfig for a SwarmSource."""
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
                model_dir, args.local, max_len=args.max_len, threads=args.threads, log_dir=cache_root() / "local-peers",
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
    settings = {"interfaces": _interfaces(args), "seeds": tuple(args.peer), **local_settings}
    return SourceConfig(model=model_dir, name=socket.gethostname(), threads=args.threads, profile=profile,
                        max_len=args.max_len, **settings)


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


def _interfaces(args: argparse.Namespace):
    from swarm.discovery.mdns import HOME_INTERFACES

    return list(args.interface) if args.interface else HOME_INTERFACES


def not_enough_memory(exc, source) -> str:
    from swarm.view.render import format_bytes

    live = len(source.directory.live) if source.directory is not None else 0
    if exc.needed_bytes > exc.available_bytes:
        missing = exc.needed_bytes - exc.available_bytes
        text = (f"not enough memory in the swarm: the model needs {format_bytes(exc.needed_bytes)}, "
                f"this device and {live} peer(s) offer {format_bytes(exc.available_bytes)}: "
                f"{format_bytes(missing)} missing. Start more peers (`swarm join` on another device), "
                f"give them more memory (--mem), or shorten the context (--max-len).")
    else:
        text = f"no plan fits the swarm: {exc}"
    if live == 0:
        text += "\n" + source.directory.diagnostic() + "\nOr try `swarm chat --local 2` to start peers on this machine."
    return text


async def _single_process(args: argparse.Namespace, model_dir: Path, console: Console) -> Backend:
    from rich.progress import Progress

    from swarm.localswarm import ChainEngine
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


class TokenRate:
    """Tokens per second over the last few tokens; None when idle."""

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


LOSS_CHECK_S = 0.2  # how often an answer checks that every planned peer is still live
CLOSE_TIMEOUT_S = 5.0


class SwarmEngine:
    """One pipeline session of the swarm behind the chat's TokenEngine interface.

    Before each turn the source re-plans if peers joined or left (the session's
    history is re-prefilled on the new stages). A planned peer that stops answering
    heartbeats mid-answer ends the answer with an error a person can act on.
    """

    def __init__(self, config, sampling) -> None:
        self.config, self.sampling = config, sampling
        self.source = None  # swarm.source.SwarmSource, replaced after a peer is lost
        self.session = None
        self.pipeline = None
        self.broken = False  # a peer was lost: the pipeline cannot finish its steps
        self.prefilled_tokens = 0  # tokens fed at the start of each turn (the runtime counts all in session)
        self.rate = TokenRate()

    async def start(self) -> None:
        """Open the source (discovery, link probes) and deploy a plan over the live peers."""
        from swarm.planner.problem import InfeasibleError
        from swarm.source import SwarmSource

        self.source = await SwarmSource(self.config).__aenter__()
        try:
            await self.source.deploy()
        except InfeasibleError as exc:
            raise BackendError(not_enough_memory(exc, self.source)) from None
        self.broken = False

    async def reset(self) -> None:
        await self._close_session()
        if self.broken or self.source is None:
            await self._close_source()
            await self.start()
        self.pipeline = await self.source.pipeline()
        self.session = await self.pipeline.open_session(self.sampling)

    async def _close_session(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            try:
                # A session whose step died with a lost peer would wait for it forever.
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await session.aclose()
            except TimeoutError:
                log.warning("closing the chat session timed out (a lost peer); closing the pipeline instead")

    async def _close_source(self) -> None:
        source, self.source, self.pipeline = self.source, None, None
        if source is not None:
            await source.aclose()

    async def aclose(self) -> None:
        """Close the session and the source (pipeline, discovery); safe to call twice."""
        await self._close_session()
        await self._close_source()

    def lost_peers(self) -> list[str]:
        """Names of peers in the deployed plan that are no longer live."""
        current = self.source.current
        if current is None or self.source.directory is None:
            return []
        live = self.source.directory.live
        names = dict(zip(current.problem["peer_ids"], (d["name"] for d in current.problem["devices"])))
        return sorted(names[pid] for pid in current.peer_ids if pid not in live)

    async def generate(self, new_ids: list[int], max_new_tokens: int, stop_ids: frozenset[int],
                       stop: asyncio.Event):
        if self.session is None or self.broken:
            await self.reset()
        pipeline = await self.source.pipeline()  # re-plans (and redeploys) if the peer set changed
        if pipeline is not self.pipeline:
            await self.reset()
        session = self.session
        self.prefilled_tokens += len(session.unfed) + len(new_ids)
        last = None
        try:
            async with contextlib.aclosing(session.generate(new_ids, max_new_tokens, stop_ids)) as tokens:
                while True:
                    token = await self._next_or_loss(tokens, session, stop)
                    if token is None:
                        break
                    last = token
                    self.rate.tick()
                    yield token
                    if stop.is_set():
                        session.cancel()  # the step in flight lands and is dropped
                        async for _ in tokens:
                            pass
                        break
        except ValueError as exc:  # raised by Session.generate before computing
            raise ContextFull(str(exc)) from None
        finally:
            if last is not None and (session.history + session.unfed)[-1:] != [last]:
                session.unfed = [last]  # keep the engine contract: every yielded token is in the sequence

    async def _next_or_loss(self, tokens, session, stop: asyncio.Event):
        """The next token, or None at the end; raises BackendError if a planned peer is lost.

        A stop asked for while waiting cancels the turn at once (the step in flight
        lands and is dropped), so a slow stage does not delay it.
        """
        from swarm.runtime.client import PeerError

        step = asyncio.ensure_future(anext(tokens, None))
        try:
            while True:
                done, _ = await asyncio.wait({step}, timeout=LOSS_CHECK_S)
                if done:
                    return step.result()
                if stop.is_set():
                    session.cancel()
                if lost := self.lost_peers():
                    self.broken = True
                    raise BackendError(
                        f"peer {', '.join(lost)} was lost mid-answer (it stopped answering heartbeats). "
                        "Ask again: the swarm re-plans without it.")
        except PeerError as exc:
            self.broken = True
            raise BackendError(f"a peer failed mid-answer: {exc}. Ask again: the swarm re-plans.") from None
        finally:
            if not step.done():
                # Cancelling the pending anext() ends the runtime's generator (and its turn),
                # so it is not still running when closed.
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await step


STATS_POLL_S = 0.5


class SourceView:
    """Copies the source's state into snapshots; polls stage statistics (which need requests)."""

    def __init__(self, engine: SwarmEngine, model: str) -> None:
        self.engine, self.model = engine, model
        self._stats: list = []
        self._notes: tuple[str, ...] = ()

    async def poll_forever(self, interval_s: float = STATS_POLL_S) -> None:
        from swarm.runtime.client import PeerError

        while True:
            pipeline = self.engine.pipeline
            if pipeline is not None and pipeline.deployment is not None and not self.engine.broken:
                try:
                    self._stats, self._notes = await pipeline.stage_stats(), ()
                except PeerError as exc:
                    self._notes = (f"stage statistics unavailable: {exc}",)
            await asyncio.sleep(interval_s)

    def snapshot(self) -> SwarmSnapshot:
        from swarm.view.from_source import SourceState, snapshot_from_source

        s = self.engine.source
        if s is None:
            return SwarmSnapshot(notes=("re-planning the swarm",))
        current = s.current
        pipeline = self.engine.pipeline
        state = SourceState(
            source_id=s.peer_id, source_name=s.config.name, source_profile=s.profile or {},
            source_mem=s.config.mem_bytes or (s.profile or {}).get("device", {}).get("mem_bytes", 0),
            announcements={pid: rec.announcement for pid, rec in (s.directory.live if s.directory else {}).items()},
            source_links=dict(s.prober.links) if s.prober else {},
            problem=current.problem if current else None, plan=current.plan if current else None,
            stats=tuple(self._stats), micro_batches=pipeline.micro_batches_in_flight if pipeline else None,
            tokens_per_s=self.engine.rate.value(), model=self.model, notes=self._notes)
        return snapshot_from_source(state)
