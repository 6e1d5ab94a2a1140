"""The topology view: pure functions from a SwarmSnapshot to rich renderables.

Nothing here reads a clock, a socket or a live object, so every layout is tested
from fixed snapshots (tests/view/test_render.py).
"""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from swarm.sizes import format_bytes
from swarm.view.snapshot import PlanState, StageState, SwarmSnapshot, unit_name

# One colour per pipeline stage, cycled; chosen to stay readable on dark and light terminals.
STAGE_COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta")
STAGE_KEYS = "123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SHARE_BAR_WIDTH = 6
LAYER_BAR_MAX_WIDTH = 96


def format_bandwidth(bytes_per_s: float | None) -> str:
    """Bandwidth in bits per second, the unit people know their networks by."""
    if bytes_per_s is None:
        return "-"
    bits = bytes_per_s * 8
    for unit, size in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= size:
            return f"{bits / size:.1f} {unit}"
    return f"{bits:.0f} bit/s"


def format_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f} ms"


def stage_key(index: int) -> str:
    return STAGE_KEYS[index % len(STAGE_KEYS)]


def stage_colour(index: int) -> str:
    return STAGE_COLOURS[index % len(STAGE_COLOURS)]


def unit_range_name(start: int, end: int, num_units: int) -> str:
    """'embed..block.10' for units [0, 12) of a 32-unit model."""
    first, last = unit_name(start, num_units), unit_name(end - 1, num_units)
    return first if end - start == 1 else f"{first}..{last}"


def share_bar(share: float | None) -> Text:
    if share is None:
        return Text("-")
    share = min(max(share, 0.0), 1.0)
    filled = round(share * SHARE_BAR_WIDTH)
    return Text.assemble(("█" * filled, "green"), ("░" * (SHARE_BAR_WIDTH - filled), "dim"), f" {share:4.0%}")


def peers_table(snapshot: SwarmSnapshot) -> Table:
    """Every peer: memory used/usable, measured compute, liveness, and the stage it serves."""
    stage_of = _stage_index_by_peer(snapshot.plan)
    table = Table(title="Peers", title_justify="left")
    table.add_column("peer")
    table.add_column("#", justify="center")
    table.add_column("memory used / usable", justify="right", no_wrap=True)
    table.add_column("compute", justify="right", no_wrap=True)
    table.add_column("status")
    for peer in sorted(snapshot.peers, key=lambda p: (stage_of.get(p.name, len(stage_of)), p.name)):
        index = stage_of.get(peer.name)
        stage = Text(stage_key(index), style=f"bold {stage_colour(index)}") if index is not None else Text("-")
        name = peer.name + (" (you)" if peer.name == snapshot.source else "")
        memory = f"{format_bytes(peer.mem_used)} / {format_bytes(peer.mem_usable)}"
        compute = "-" if peer.decode_ms is None else f"{peer.decode_ms:.1f} ms/token"
        if peer.threads:
            compute += f" ({peer.threads} thr)"
        table.add_row(name, stage, memory, compute, _liveness(peer.alive, peer.last_seen_s))
    return table


def _liveness(alive: bool, last_seen_s: float | None) -> Text:
    seen = "" if last_seen_s is None else f" {last_seen_s:.1f}s ago"
    return Text("alive" + seen, style="green") if alive else Text("LOST" + seen, style="bold red")


def links_table(snapshot: SwarmSnapshot) -> Table:
    """Every measured link with its bandwidth and round-trip time."""
    table = Table(title="Links", title_justify="left")
    table.add_column("link")
    table.add_column("bandwidth", justify="right")
    table.add_column("round trip", justify="right")
    for link in sorted(snapshot.links, key=lambda l: (l.a, l.b)):
        table.add_row(f"{link.a} ↔ {link.b}", format_bandwidth(link.bandwidth_bps), format_ms(link.rtt_s))
    return table


def layer_map(plan: PlanState) -> Group:
    """The model's units as one bar, each unit marked with the key of the stage that serves it."""
    n = plan.num_units
    per_cell = max(1, -(-n // LAYER_BAR_MAX_WIDTH))  # units per character on very deep models
    bar = Text()
    for cell_start in range(0, n, per_cell):
        index = _stage_index_of_unit(plan.stages, cell_start)
        if index is None:
            bar.append("·", style="dim red")  # a unit no stage serves: the plan is broken
        else:
            bar.append(stage_key(index), style=f"bold black on {stage_colour(index)}")
    axis = Text(f"unit 0 (embed)".ljust(max(0, len(bar) - len(f"{n - 1} (head)"))) + f"{n - 1} (head)", style="dim")
    return Group(Text("layers ", style="bold") + bar, Text("       ") + axis)


def plan_title(plan: PlanState) -> str:
    title = f"Plan: {plan.model}, {plan.num_units} units in {len(plan.stages)} stages"
    if plan.objective:
        title += f", {plan.objective}"
    if plan.predicted_ms_per_token is not None:
        title += f", predicted {plan.predicted_ms_per_token:.1f} ms/token"
    return title


def stages_table(plan: PlanState) -> Table:
    """The pipeline in order: which units each peer runs and how busy it is."""
    table = Table()
    table.add_column("#", justify="center")
    table.add_column("peer")
    table.add_column("units", no_wrap=True)
    table.add_column("busy", no_wrap=True)
    table.add_column("tok/s", justify="right")
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("queue", justify="right")  # micro-batches waiting at this stage
    for index, stage in enumerate(plan.stages):
        table.add_row(
            Text(stage_key(index), style=f"bold {stage_colour(index)}"),
            stage.peer,
            f"{unit_range_name(stage.start, stage.end, plan.num_units)} ({stage.end - stage.start})",
            share_bar(stage.busy_share),
            "-" if stage.tokens_per_s is None else f"{stage.tokens_per_s:.1f}",
            "-" if stage.step_ms is None else f"{stage.step_ms:.1f} ms",
            "-" if stage.in_flight is None else str(stage.in_flight),
        )
    return table


def plan_view(plan: PlanState | None) -> RenderableType:
    if plan is None:
        return Text("No plan yet: waiting for peers.", style="yellow")
    return Group(layer_map(plan), Text(plan_title(plan), style="italic"), stages_table(plan))


def topology(snapshot: SwarmSnapshot, title: str = "swarm", compact: bool = False) -> Panel:
    """The whole topology view: peers, links, the layer map and per-stage load.

    ``compact`` leaves out the peers and links tables (the panel under a streaming
    answer, which must fit small terminals).
    """
    parts: list[RenderableType] = []
    if not compact:
        parts.append(peers_table(snapshot))
        if snapshot.links:
            parts.append(links_table(snapshot))
    parts.append(plan_view(snapshot.plan))
    summary = []
    if snapshot.tokens_per_s is not None:
        summary.append(f"{snapshot.tokens_per_s:.1f} tok/s")
    if snapshot.micro_batches is not None:
        plural = "" if snapshot.micro_batches == 1 else "es"
        summary.append(f"{snapshot.micro_batches} micro-batch{plural} in flight")
    if summary:
        parts.append(Text("pipeline: " + ", ".join(summary), style="bold"))
    parts.extend(Text(line, style="cyan") for line in snapshot.transfers)
    parts.extend(Text(note, style="bold red") for note in snapshot.notes)
    return Panel(Group(*parts), title=title, title_align="left")


def _stage_index_by_peer(plan: PlanState | None) -> dict[str, int]:
    return {} if plan is None else {stage.peer: i for i, stage in enumerate(plan.stages)}


def _stage_index_of_unit(stages: tuple[StageState, ...], unit: int) -> int | None:
    return next((i for i, s in enumerate(stages) if s.start <= unit < s.end), None)
