"""The topology view's layout, from fixed snapshots, read back as plain text."""

from __future__ import annotations

import asyncio
import io

from rich.console import Console
from rich.live import Live

from swarm.source_state import SourceState
from swarm.view.from_source import snapshot_from_source
from swarm.view.live import refresh_forever
from swarm.sizes import format_bytes
from swarm.view.render import format_bandwidth, topology, unit_range_name
from swarm.view.snapshot import LinkState, PeerState, PlanState, StageState, SwarmSnapshot
from tests.helpers.render import cells, render_text

MIB = 1 << 20

SNAPSHOT = SwarmSnapshot(
    source="laptop",
    peers=(
        PeerState("laptop", mem_used=180 * MIB, mem_usable=256 * MIB, decode_ms=52.5, last_seen_s=0.0),
        PeerState("desktop", mem_used=300 * MIB, mem_usable=2048 * MIB, decode_ms=21.0, threads=4, last_seen_s=0.4),
        PeerState("phone", mem_used=0, mem_usable=128 * MIB, decode_ms=310.0, alive=False, last_seen_s=12.3),
    ),
    links=(
        LinkState("laptop", "desktop", bandwidth_bps=6.25e6, rtt_s=0.0021),  # 50 Mbit/s
        LinkState("desktop", "phone", bandwidth_bps=125_000.0, rtt_s=0.0405),  # 1 Mbit/s
    ),
    plan=PlanState(
        model="SmolLM2-135M-Instruct",
        num_units=32,
        objective="latency",
        predicted_ms_per_token=48.2,
        stages=(
            StageState("laptop", 0, 12, busy_share=0.41, tokens_per_s=19.5, in_flight=1, step_ms=20.1),
            StageState("desktop", 12, 32, busy_share=0.87, tokens_per_s=19.4, in_flight=2, step_ms=33.0),
        ),
    ),
    tokens_per_s=19.4,
    micro_batches=3,
)


def test_peers_show_memory_compute_and_liveness():
    text = render_text(topology(SNAPSHOT))
    lines = {cells(line)[0]: line for line in text.splitlines() if line.count("│") > 5}
    assert "laptop (you)" in lines
    laptop = lines["laptop (you)"]
    assert "180.0 MiB / 256.0 MiB" in laptop and "52.5 ms/token" in laptop and "alive" in laptop
    desktop = lines["desktop"]
    assert "300.0 MiB / 2.0 GiB" in desktop and "21.0 ms/token (4 thr)" in desktop
    phone = lines["phone"]
    assert "LOST 12.3s ago" in phone and "0 B / 128.0 MiB" in phone


def test_links_show_bandwidth_and_round_trip():
    text = render_text(topology(SNAPSHOT))
    fast = next(line for line in text.splitlines() if "laptop ↔ desktop" in line)
    assert "50.0 Mbit/s" in fast and "2.10 ms" in fast
    slow = next(line for line in text.splitlines() if "desktop ↔ phone" in line)
    assert "1.0 Mbit/s" in slow and "40.50 ms" in slow


def test_layer_map_lays_units_across_stages():
    text = render_text(topology(SNAPSHOT))
    bar_line = next(line for line in text.splitlines() if "layers " in line)
    bar = bar_line.split("layers ")[1].split()[0]
    assert bar == "1" * 12 + "2" * 20  # one character per unit, keyed by stage
    assert "unit 0 (embed)" in text and "31 (head)" in text
    stage1 = next(line for line in text.splitlines() if "embed..block.10 (12)" in line)
    assert "laptop" in stage1 and "41%" in stage1 and "19.5" in stage1 and "20.1 ms" in stage1
    stage2 = next(line for line in text.splitlines() if "block.11..head (20)" in line)
    assert "desktop" in stage2 and "87%" in stage2 and cells(stage2)[-1] == "2"
    assert "Plan: SmolLM2-135M-Instruct, 32 units in 2 stages, latency, predicted 48.2 ms/token" in text
    assert "pipeline: 19.4 tok/s, 3 micro-batches in flight" in text


def test_peers_are_listed_in_pipeline_order_with_their_stage_key():
    text = render_text(topology(SNAPSHOT))
    rows = [cells(line) for line in text.splitlines() if line.count("│") > 5 and "MiB" in line]
    assert [r[0] for r in rows] == ["laptop (you)", "desktop", "phone"]
    assert [r[1] for r in rows] == ["1", "2", "-"]


def test_unserved_units_and_missing_plan_are_visible():
    broken = PlanState("m", 6, (StageState("a", 0, 3),))
    text = render_text(topology(SwarmSnapshot(plan=broken)))
    assert "111···" in text
    empty = render_text(topology(SwarmSnapshot(notes=("No peers found on 127.0.0.1.",))))
    assert "No plan yet: waiting for peers." in empty and "No peers found on 127.0.0.1." in empty


def test_compact_view_keeps_only_the_pipeline():
    text = render_text(topology(SNAPSHOT, compact=True))
    assert "layers 111111111111" in text and "pipeline: 19.4 tok/s" in text
    assert "Peers" not in text and "Links" not in text and "desktop ↔ phone" not in text


def test_deep_models_fit_the_width():
    plan = PlanState("big", 200, (StageState("a", 0, 100), StageState("b", 100, 200)))
    text = render_text(topology(SwarmSnapshot(plan=plan)), width=140)
    bar = next(line for line in text.splitlines() if "layers " in line).split("layers ")[1].split()[0]
    assert bar == "1" * 34 + "2" * 33  # three units per character


def test_formatters():
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(None) == "-"
    assert format_bandwidth(125e6) == "1.0 Gbit/s" and format_bandwidth(None) == "-"
    assert unit_range_name(5, 6, 32) == "block.4"


async def test_live_refresh_task_redraws_new_snapshots():
    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=True, color_system=None)
    count = 0

    def take() -> SwarmSnapshot:
        nonlocal count
        count += 1
        return SwarmSnapshot(peers=(PeerState(f"peer-{count}", 0, MIB),))

    with Live(console=console, auto_refresh=False) as live:
        task = asyncio.create_task(refresh_forever(live, take, interval_s=0.01))
        try:
            async with asyncio.timeout(5):
                while "peer-3" not in out.getvalue():
                    await asyncio.sleep(0.01)
        finally:
            task.cancel()
    assert "peer-1" in out.getvalue() and "peer-2" in out.getvalue()


def test_weights_moving_to_a_peer_show_in_the_view():
    state = SourceState(source_id="s", source_name="laptop", source_profile={"units": []}, source_mem=100,
                        transfers={"desktop": {"done": 12_000_000, "total": 40_000_000, "rate_bps": 8_000_000.0}})
    snapshot = snapshot_from_source(state)
    assert snapshot.transfers == ("desktop receiving weights: 12.0 MB / 40.0 MB at 8.0 MB/s, 4 s left",)
    assert "desktop receiving weights: 12.0 MB / 40.0 MB at 8.0 MB/s, 4 s left" in render_text(topology(snapshot))
    assert "receiving weights" not in render_text(topology(SNAPSHOT))
