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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prompt_toolkit import PromptSession
from prompt_toolkit.history import FileHistory, InMemoryHistory
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from swarm.chat.conversation import DEFAULT_MAX_NEW_TOKENS, ContextFull, Conversation
from swarm.cli.backend import BackendError, TokenRate, add_backend_arguments, history_path, open_backend
from swarm.cli.common import add_secret_arguments, use_swarm_secret
from swarm.view.live import refresh_forever
from swarm.view.render import links_table, peers_table, plan_view, topology
from swarm.runtime.client import PeerError
from swarm.view.snapshot import SwarmSnapshot


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


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help="chat with a model split across the swarm", description=__doc__)
    add_backend_arguments(parser)
    add_secret_arguments(parser)
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--view", action="store_true", help="start with the topology panel shown")
    parser.add_argument("--no-history-file", action="store_true", help="keep input history in memory only")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = Console(highlight=False)
    if not args.no_swarm:
        use_swarm_secret(args)
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
    recoveries: Callable[[], tuple]  # the backend's RecoveryEvents so far
    rate: TokenRate
    recoveries_shown: int = 0  # the number (RecoveryEvent.number) of the last one shown


async def _chat(args: argparse.Namespace, console: Console) -> int:
    async with open_backend(args, console) as backend, _closing(Conversation(
            backend.open_session, backend.tokenizer, system=args.system,
            max_new_tokens=args.max_new_tokens, stop_ids=backend.stop_ids)) as conversation:
        state = ChatState(view=args.view, snapshot=backend.snapshot, recoveries=backend.recoveries,
                          rate=backend.rate)
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


@contextlib.asynccontextmanager
async def _closing(conversation: Conversation):
    try:
        yield conversation
    finally:
        await conversation.aclose()


def unseen_recoveries(events: Sequence, shown: int) -> list:
    """The recoveries numbered after ``shown``, oldest first. By number, not by index: the
    source keeps only its last few, so the list's length stops growing while numbers go on."""
    return [event for event in events if event.number > shown]


def _recovery_notices(state: ChatState, console: Console, mid_answer: bool) -> None:
    """One line per recovery from a lost peer since the last notice."""
    for event in unseen_recoveries(state.recoveries(), state.recoveries_shown):
        console.print(("\n" if mid_answer else "") + f"[{event.describe()}]", style="yellow", markup=False)
        state.recoveries_shown = event.number


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
    me = asyncio.current_task()
    stopped = False

    def on_sigint() -> None:
        nonlocal stopped
        if stopped:
            me.cancel()  # second Ctrl-C: unwind now; `async with` still stops the local swarm
        stopped = True
        conversation.stop()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    began = time.perf_counter()
    first_token_s: float | None = None
    pieces: list[str] = []
    try:
        async with _answer_display(state, console, pieces):
            async for piece in conversation.ask(text):
                if first_token_s is None:
                    first_token_s = time.perf_counter() - began
                pieces.append(piece)
                state.rate.tick()
                if not state.view and unseen_recoveries(state.recoveries(), state.recoveries_shown):
                    _recovery_notices(state, console, mid_answer=True)
                if not state.view:
                    console.print(piece, end="", markup=False, soft_wrap=True)
                    console.file.flush()
    except (BackendError, PeerError) as exc:  # PeerError: a lost peer the swarm could not recover from
        _recovery_notices(state, console, mid_answer=True)
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
    _recovery_notices(state, console, mid_answer=False)
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
