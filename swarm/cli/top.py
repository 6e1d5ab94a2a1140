"""`swarm top`: a live view of the swarm: peers, links, the plan, and each stage's load.

It watches without deploying anything: the plan shown is the one this device would
use as a source, and each stage's busy share and tokens/s come from its peer's own
counters, so a chat running elsewhere shows up as load here. Ctrl-C leaves (and
stops the peers that ``--local N`` started).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from dataclasses import dataclass

from rich.console import Console
from rich.live import Live

import dataclasses

from swarm.cli.backend import BackendError, add_backend_arguments, resolve_model_dir, source_config
from swarm.cli.common import add_secret_arguments, use_swarm_secret
from swarm.view.from_source import snapshot_from_source
from swarm.view.live import refresh_forever
from swarm.view.render import topology
from swarm.view.snapshot import SwarmSnapshot

POLL_S = 1.0
PING_TIMEOUT_S = 2.0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("top", help="live topology view of the swarm", description=__doc__)
    add_backend_arguments(parser)
    add_secret_arguments(parser)
    parser.add_argument("--interval", type=float, default=POLL_S, help="seconds between refreshes")
    parser.add_argument("--once", action="store_true", help="print one view and leave (for scripts)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.no_swarm:
        raise SystemExit("error: swarm top watches a swarm; --no-swarm has nothing to show")
    use_swarm_secret(args)
    console = Console(highlight=False)
    try:
        return asyncio.run(_top(args, console))
    except BackendError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        return 1


async def _top(args: argparse.Namespace, console: Console) -> int:
    import torch

    torch.set_num_threads(args.threads)
    model_dir = await asyncio.to_thread(resolve_model_dir, args, console)
    async with contextlib.AsyncExitStack() as stack:
        from swarm.source import SwarmSource

        source = await stack.enter_async_context(SwarmSource(await source_config(args, model_dir, console, stack)))
        observer = Observer(source, model_dir.name)
        with console.status("looking for peers and measuring links"):
            await observer.poll()
        if args.once:
            console.print(topology(observer.snapshot()))
            return 0
        with Live(console=console, auto_refresh=False) as live:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(observer.poll_forever(args.interval))
                tasks.create_task(refresh_forever(live, observer.snapshot, interval_s=args.interval))
    return 0


@dataclass(frozen=True)
class StageLoad:
    """A stage's load over the last poll, from its peer's PING counters."""

    busy_share: float
    tokens_per_s: float
    steps_per_s: float
    queued: int


def stage_load(before: dict, after: dict, seconds: float) -> StageLoad:
    span = max(seconds, 1e-9)
    return StageLoad(min(1.0, max(0.0, (after["busy_s"] - before["busy_s"]) / span)),
                     max(0.0, (after["tokens"] - before["tokens"]) / span),
                     max(0.0, (after["steps"] - before["steps"]) / span), int(after.get("queued", 0)))


def transfer_note(name: str, transfer: dict) -> str:
    """'local-1 receiving weights: 12.0 MB / 40.0 MB at 8.1 MB/s, 3 s left' (a peer's PING ``transfer``)."""
    from swarm.sizes import describe_transfer as describe

    return f"{name} receiving weights: {describe(transfer['done'], transfer['total'], transfer['rate_bps'])}"


class Observer:
    """Re-plans when peers come or go and reads every planned peer's counters."""

    def __init__(self, source, model: str) -> None:
        self.source, self.model = source, model
        self.planned = None  # swarm.source_plan.SourcePlan
        self.loads: dict[str, StageLoad] = {}  # peer id -> load
        self.notes: tuple[str, ...] = ()
        self._last: dict[str, tuple[float, dict]] = {}

    async def poll_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.poll()

    async def poll(self) -> None:
        from swarm.planner.problem import InfeasibleError
        from swarm.source import not_enough_memory

        state = self.source.state()
        if self.planned is None or self.planned.peer_ids != frozenset(state.announcements):
            try:
                self.planned, self.notes = await self.source.plan(), ()
            except InfeasibleError as exc:
                self.planned = None
                self.notes = (not_enough_memory(exc, len(state.announcements), state.diagnostic),)
        moving = []
        for pid, status in (await self.source.peer_counters(PING_TIMEOUT_S)).items():
            now = time.monotonic()
            if pid in self._last:
                then, before = self._last[pid]
                self.loads[pid] = stage_load(before, status, now - then)
            self._last[pid] = (now, status)
            if status.get("transfer") and pid in state.announcements:
                moving.append(transfer_note(state.announcements[pid].name, status["transfer"]))
        self.notes = tuple(n for n in self.notes if " receiving weights: " not in n) + tuple(sorted(moving))

    def snapshot(self) -> SwarmSnapshot:
        planned = self.planned
        stats = ()
        if planned is not None:
            ids = planned.problem["peer_ids"]
            stats = tuple(self.loads.get(ids[stage.device]) for stage in planned.plan.stages)
        # The plan shown is this observer's own (top deploys nothing), with the peers' own counters.
        state = dataclasses.replace(self.source.state(), problem=planned.problem if planned else None,
                                    plan=planned.plan if planned else None, stats=stats, model=self.model,
                                    notes=self.notes)
        return snapshot_from_source(state)
