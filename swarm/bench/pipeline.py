"""The pipeline benchmark behind `swarm bench` and benchmarks/bench_pipeline.py.

Measured side by side in one run, one torch thread per process (the paper's
setting: prompt 32 tokens, 96 generated, float32):

- single-process shard path vs sequential inference over 3 local peers (ms/token),
  and the transport overhead per hop derived from the two; once as the OS places
  the processes, and once with every process of the benchmark pinned to one core
  (on a machine with fewer free cores than processes the OS moves each stage to
  whichever core is idle, and a shard computes slower on a core that was idle:
  the one-core figures show what the split itself costs, without that);
- a 2-stage pipeline with m micro-batches: No-Bubbles vs Bubbles (tok/s), and the
  planner's simulator fed with the stage and hop times measured at m = 1.

- encryption on and off: the same sequential chain and the same 2-stage pipeline
  over peers of a fresh private swarm (CURVE) and over peers run --insecure.

Runs alternate (single, pipeline, single, pipeline, ...; on, off, off, on, ...) and
report medians, so background load on a shared machine hits both sides alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import psutil
import torch

from swarm import secret
from swarm.model.local import LocalChain, even_cuts, generate
from swarm.model.units import ModelLayout
from swarm.planner.simulate import simulate_pipeline
from swarm.runtime.client import PeerClient
from swarm.runtime.deploy import StagePlacement
from swarm.runtime.engine import Pipeline, PipelineConfig
from swarm.localswarm import local_peers
from swarm.runtime.schedule import Layout, Mode

log = logging.getLogger(__name__)

PROBE_ROUNDS = 200


@dataclass(frozen=True)
class BenchConfig:
    model_dir: Path
    prompt_tokens: int = 32
    new_tokens: int = 96
    repeats: int = 5
    sequential_peers: int = 3
    micro_batches: tuple[int, ...] = (2, 4)
    dtype: str = "float32"


@dataclass(frozen=True)
class SequentialFigures:
    """The single process against source + peers, sequential, under one placement of the processes."""

    single_process_ms_per_token: float
    sequential_ms_per_token: float
    sequential_over_single: float  # median over back-to-back pairs
    hop_overhead_ms: float  # median over pairs of (sequential - single) / hops: everything a hop adds per token
    transport_ms_per_hop: float  # (sequential wall - shards' compute time) / hops: wire, threads, scheduling


@dataclass(frozen=True)
class PipelineFigures:
    m: int
    no_bubbles_tok_s: float
    bubbles_tok_s: float
    simulated_tok_s: float  # No-Bubbles, predicted from the stage/hop times measured at m = 1
    simulated_bubbles_tok_s: float
    no_bubbles_over_bubbles: float
    no_bubbles_over_simulated: float
    # Stage step times measured during the No-Bubbles run itself (both stages computing at
    # once): on a machine with fewer free cores than stages they grow, and so does this gap.
    in_run_stage_step_ms: list[float]
    simulated_in_run_tok_s: float
    no_bubbles_over_simulated_in_run: float


@dataclass(frozen=True)
class EncryptionFigures:
    """The same runs with every socket CURVE-encrypted and with plain TCP (--insecure)."""

    sequential_ms_per_token_on: float
    sequential_ms_per_token_off: float
    sequential_slowdown: float  # median over back-to-back pairs of on/off - 1 (0.03: on is 3% slower)
    pipelined_tok_s_on: float  # 2 stages, m micro-batches, No-Bubbles
    pipelined_tok_s_off: float
    pipelined_slowdown: float  # median over pairs of (off tok/s) / (on tok/s) - 1
    m: int
    repeats: int


@dataclass(frozen=True)
class BenchResult:
    single_process_ms_per_token: float
    sequential_ms_per_token: float
    sequential_over_single: float
    hops: int
    hop_overhead_ms: float  # (sequential - single) / hops: everything a hop adds per token
    transport_ms_per_hop: float  # (sequential wall - shards' compute time) / hops: wire, threads, scheduling
    probe_hop_ms: float  # half a PROBE round trip carrying one token's hidden state
    one_core: SequentialFigures | None  # the same, every process pinned to one core (None: cannot pin here)
    pipeline: list[PipelineFigures]
    two_stage_cut: int
    two_stage_m1_ms_per_token: float
    stage_step_ms: list[float]
    hop_ms: float
    encryption: EncryptionFigures | None = None
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def bench_prompts(count: int, length: int, vocab: int) -> list[list[int]]:
    """Deterministic prompts of ``length`` tokens (distinct per sequence)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(100, min(vocab, 20000), (length,), generator=g).tolist() for _ in range(count)]


def balanced_cut(layout: ModelLayout) -> int:
    """The unit splitting a 2-stage chain into halves of equal parameters (embedding lookups are free)."""
    work = layout.unit_param_counts()
    work[0] = 0
    total, best, run = sum(work), 1, 0
    for cut in range(1, layout.num_units):
        run += work[cut - 1]
        if abs(2 * run - total) < abs(2 * sum(work[:best]) - total):
            best = cut
    return best


def _time_local(chain: LocalChain, prompt: list[int], new: int) -> float:
    began = time.perf_counter()
    generate(chain, [prompt], new)
    return (time.perf_counter() - began) / new


async def _time_pipeline(pipe: Pipeline, prompts: list[list[int]], new: int) -> float:
    """Seconds per generated token of the whole batch (all prompts admitted at once)."""
    began = time.perf_counter()
    outs = await pipe.generate_all(prompts, new)
    return (time.perf_counter() - began) / sum(len(o) for o in outs)


async def _probe_hop_s(address: str, payload: int) -> float:
    async with PeerClient(address) as peer:
        rtts = [await peer.probe(send_bytes=payload, reply_bytes=payload) for _ in range(PROBE_ROUNDS)]
    return statistics.median(rtts) / 2


async def _bench(config: BenchConfig, peers: list[str], report: Callable[[str], None]) -> BenchResult:
    layout = ModelLayout.read(config.model_dir)
    n, new, max_len = layout.num_units, config.new_tokens, config.prompt_tokens + config.new_tokens
    prompt = bench_prompts(1, config.prompt_tokens, layout.vocab_size)[0]

    # --- sequential: single process vs source (embedding) + 3 peers, under each placement, interleaved
    chain = LocalChain.load(config.model_dir, [(0, n)], max_slots=1, max_len=max_len, dtype=config.dtype)
    cuts = [(0, 1)] + [(1 + a, 1 + b) for a, b in even_cuts(n - 1, config.sequential_peers)]
    plan = tuple(StagePlacement(addr, a, b) for addr, (a, b) in zip([None, *peers], cuts))
    hops = len(plan)
    all_cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    placements: dict[str, set[int]] = {"os": all_cpus}
    if len(all_cpus) > 1:
        placements["one_core"] = {min(all_cpus)}
    single, seq, busy = ({name: [] for name in placements} for _ in range(3))
    async with Pipeline(PipelineConfig(config.model_dir, plan, max_len=max_len, dtype=config.dtype)) as pipe:
        await _time_pipeline(pipe, [prompt], 4)  # warm-up both paths
        _time_local(chain, prompt, 4)
        try:
            for _ in range(config.repeats):
                for name, cpus in placements.items():
                    _pin_everything(cpus)
                    single[name].append(_time_local(chain, prompt, new))
                    await pipe.stage_stats()
                    seq[name].append(await _time_pipeline(pipe, [prompt], new))
                    # Time the shards spent computing per token; the rest of the wall time is wire and scheduling.
                    busy[name].append(sum(s.busy_share / s.steps_per_s for s in await pipe.stage_stats()))
                    report(f"sequential, {name} placement: single {single[name][-1] * 1e3:.1f} ms/token, "
                           f"3 peers {seq[name][-1] * 1e3:.1f} ms/token (stages busy {busy[name][-1] * 1e3:.1f} ms)")
        finally:
            _pin_everything(all_cpus)
    del chain

    def figures(name: str) -> SequentialFigures:
        # The ratio and the overhead are medians over back-to-back pairs (single, then
        # sequential, a few seconds apart): this machine's speed drifts by more than the
        # effect between repeats, so a ratio of two separate medians would mostly measure the drift.
        pairs = list(zip(single[name], seq[name], busy[name]))
        return SequentialFigures(
            statistics.median(single[name]) * 1e3, statistics.median(seq[name]) * 1e3,
            statistics.median(q / s for s, q, _ in pairs),
            statistics.median(q - s for s, q, _ in pairs) / hops * 1e3,
            statistics.median(q - b for _, q, b in pairs) / hops * 1e3)

    as_placed = figures("os")
    probe_s = await _probe_hop_s(peers[0], layout.hidden_size * 4)

    # --- 2-stage pipeline: source [0, cut) + one peer [cut, n); one deployment for every m and mode,
    # runs interleaved per repeat so that drifting background load hits every configuration alike.
    cut = balanced_cut(layout)
    two = (StagePlacement(None, 0, cut), StagePlacement(peers[0], cut, n))
    ms = sorted(set(config.micro_batches))
    slots = max(ms)
    runs: dict[tuple[int, Mode], list[float]] = {}
    step_times: dict[tuple[int, Mode], list[list[float]]] = {}
    async with Pipeline(PipelineConfig(config.model_dir, two, layout=Layout(slots, 1), max_len=max_len,
                                       dtype=config.dtype)) as pipe:
        await _time_pipeline(pipe, [prompt], 4)
        for _ in range(config.repeats):
            for m, mode in [(1, Mode.NO_BUBBLES)] + [(m, mode) for m in ms for mode in (Mode.NO_BUBBLES, Mode.BUBBLES)]:
                pipe.mode = mode
                prompts = bench_prompts(m, config.prompt_tokens, layout.vocab_size)
                await pipe.stage_stats()
                runs.setdefault((m, mode), []).append(await _time_pipeline(pipe, prompts, new))
                stats = await pipe.stage_stats()
                step_times.setdefault((m, mode), []).append([s.busy_share / s.steps_per_s for s in stats])
                report(f"2 stages, m={m} {mode.value}: {1 / runs[(m, mode)][-1]:.1f} tok/s")

    def median_stages(key) -> list[float]:
        return [statistics.median(col) for col in zip(*step_times[key])]

    m1_s = statistics.median(runs[(1, Mode.NO_BUBBLES)])
    stage_s = median_stages((1, Mode.NO_BUBBLES))
    hop_s = max(0.0, m1_s - sum(stage_s)) / len(stage_s)  # the rest of a round trip, shared by its 2 hops
    hops_s = [hop_s] * len(stage_s)
    rows = []
    for m in ms:
        nb = 1 / statistics.median(runs[(m, Mode.NO_BUBBLES)])
        bb = 1 / statistics.median(runs[(m, Mode.BUBBLES)])
        sim = simulate_pipeline(stage_s, hops_s, m=m, b=1).tokens_per_s
        sim_bubbles = simulate_pipeline(stage_s, hops_s, m=m, b=1, barrier=True).tokens_per_s
        in_run = median_stages((m, Mode.NO_BUBBLES))
        sim_in_run = simulate_pipeline(in_run, hops_s, m=m, b=1).tokens_per_s
        rows.append(PipelineFigures(m, nb, bb, sim, sim_bubbles, nb / bb, nb / sim,
                                       [t * 1e3 for t in in_run], sim_in_run, nb / sim_in_run))

    return BenchResult(
        **asdict(as_placed), hops=hops, probe_hop_ms=probe_s * 1e3,
        one_core=figures("one_core") if "one_core" in placements else None, pipeline=rows, two_stage_cut=cut, two_stage_m1_ms_per_token=m1_s * 1e3,
        stage_step_ms=[s * 1e3 for s in stage_s], hop_ms=hop_s * 1e3,
        config={**asdict(config), "model_dir": str(config.model_dir), "threads_per_process": 1},
    )


async def _bench_encryption(config: BenchConfig, peers_on: list[str], peers_off: list[str],
                            swarm: secret.SwarmSecret, report: Callable[[str], None]) -> EncryptionFigures:
    """Sequential ms/token and pipelined tok/s over CURVE peers and over plain peers, interleaved."""
    layout = ModelLayout.read(config.model_dir)
    n, new, max_len = layout.num_units, config.new_tokens, config.prompt_tokens + config.new_tokens
    m = max(config.micro_batches)
    prompt = bench_prompts(1, config.prompt_tokens, layout.vocab_size)[0]
    batch = bench_prompts(m, config.prompt_tokens, layout.vocab_size)
    cuts = [(0, 1)] + [(1 + a, 1 + b) for a, b in even_cuts(n - 1, len(peers_on))]
    cut = balanced_cut(layout)
    sides = {"on": (swarm, peers_on), "off": (secret.INSECURE, peers_off)}

    async def interleaved(what: str, plan_of, prompts: list[list[int]], layout: Layout) -> dict[str, list[float]]:
        """Seconds per token over the on and the off peers, repeats alternating which goes first.
        (A peer hosts one deployment at a time: each phase deploys its own plans.)"""
        times: dict[str, list[float]] = {"on": [], "off": []}
        async with contextlib.AsyncExitStack() as stack:
            pipes = {}
            for side, (membership, peers) in sides.items():
                with secret.using(membership):  # this pipeline's sockets are made now, for this swarm
                    pipes[side] = await stack.enter_async_context(Pipeline(PipelineConfig(
                        config.model_dir, plan_of(peers), layout=layout, max_len=max_len, dtype=config.dtype)))
                await _time_pipeline(pipes[side], prompts, 4)  # warm-up
            for r in range(config.repeats):
                for side in (("on", "off") if r % 2 == 0 else ("off", "on")):
                    times[side].append(await _time_pipeline(pipes[side], prompts, new))
                    report(f"encryption {side}, {what}: {times[side][-1] * 1e3:.2f} ms/token "
                           f"({1 / times[side][-1]:.1f} tok/s)")
        return times

    seq = await interleaved("sequential", lambda peers: tuple(
        StagePlacement(a, s, e) for a, (s, e) in zip([None, *peers], cuts)), [prompt], Layout(1, 1))
    two = await interleaved(f"2 stages m={m}", lambda peers: (StagePlacement(None, 0, cut), StagePlacement(peers[0], cut, n)),
                            batch, Layout(m, 1))
    med = statistics.median
    return EncryptionFigures(
        med(seq["on"]) * 1e3, med(seq["off"]) * 1e3, med(a / b for a, b in zip(seq["on"], seq["off"])) - 1,
        1 / med(two["on"]), 1 / med(two["off"]), med(a / b for a, b in zip(two["on"], two["off"])) - 1,
        m, config.repeats)


def run_encryption_bench(config: BenchConfig, report: Callable[[str], None] = log.info) -> EncryptionFigures:
    """Only the encryption comparison: 2 x ``sequential_peers`` local peers, half of them --insecure."""
    torch.set_num_threads(1)
    swarm = secret.SwarmSecret.new()  # a private swarm of the benchmark's own
    with local_peers(config.sequential_peers, threads=1, secret=swarm.join_code) as on, \
            local_peers(config.sequential_peers, threads=1, args=["--insecure"]) as off:
        return asyncio.run(_bench_encryption(config, on, off, swarm, report))


def _pin_everything(cpus: set[int]) -> None:
    """Every thread of this process and of the peers it started onto ``cpus`` (Linux)."""
    if not cpus:
        return
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            for thread in process.threads():
                with contextlib.suppress(OSError):  # a thread that just ended
                    os.sched_setaffinity(thread.id, cpus)


def run_bench(config: BenchConfig, report: Callable[[str], None] = log.info) -> BenchResult:
    """Start the local peers (one torch thread each), run every measurement, stop the peers.

    ``report`` gets a line after each measured run (progress: a full run takes minutes)."""
    torch.set_num_threads(1)
    swarm = secret.SwarmSecret.new()  # a private swarm of the benchmark's own
    with secret.using(swarm), local_peers(config.sequential_peers, threads=1, secret=swarm.join_code) as peers, \
            local_peers(config.sequential_peers, threads=1, args=["--insecure"]) as insecure:
        result = asyncio.run(_bench(config, peers, report))
        encryption = asyncio.run(_bench_encryption(config, peers, insecure, swarm, report))
    return dataclasses.replace(result, encryption=encryption)
