"""Recovery from a lost peer, measured: the `recovery` part of `swarm bench`.

A source and 3 local peers (any two hold the model); one sequence generates; at its
20th token the peer holding the last stage is lost, two ways in turn: SIGKILL (its
connections close at once: a crash, a Ctrl-C) and SIGSTOP (a frozen device or a lost
link: its connections stay open, only missed heartbeats tell). Measured per run, from
the loss: detection (the directory dropping the peer), re-plan + deploy, replay (the
sequence's whole history as one prefill), and the loss to the next token the stream
yields. The lost peer is killed and restarted between runs; medians are reported per
kind of loss, the two kinds interleaved so that a drifting machine biases neither.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from swarm.discovery.liveness import LivenessConfig

log = logging.getLogger(__name__)

KILL_AT_TOKEN = 20
LOSSES = ("kill", "freeze")  # SIGKILL; SIGSTOP


@dataclass(frozen=True)
class RecoveryRun:
    loss: str  # kill | freeze
    kill_to_next_token_s: float  # the loss -> the next token
    detection_s: float  # the loss -> the source's detection
    replan_deploy_s: float  # detection -> the new deployment ready
    replay_s: float  # new deployment -> the first token after it
    peers_after: int


@dataclass(frozen=True)
class RecoveryFigures:
    """Medians over the runs of each kind, and the bound detection of a frozen peer must stay within."""

    kill_to_next_token_s: float  # SIGKILL (target: at most 1.0 s)
    detection_s: float
    replan_deploy_s: float
    replay_s: float
    detection_to_next_token_s: float
    heartbeat_bound_s: float  # LivenessConfig.drop_bound_s of the source
    frozen_to_next_token_s: float  # SIGSTOP (target: at most heartbeat_bound_s + 1.0 s)
    frozen_detection_s: float
    frozen_detection_to_next_token_s: float
    runs: list[RecoveryRun] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def run_recovery_bench(model_dir: Path, repeats: int = 5, prompt_tokens: int = 32, new_tokens: int = 96,
                       liveness: LivenessConfig = LivenessConfig(),
                       report: Callable[[str], None] = log.info) -> RecoveryFigures:
    return asyncio.run(_bench(Path(model_dir), repeats, prompt_tokens, new_tokens, liveness, report))


async def _bench(model_dir: Path, repeats: int, prompt_tokens: int, new_tokens: int, liveness: LivenessConfig,
                 report: Callable[[str], None]) -> RecoveryFigures:
    import torch

    from swarm.discovery.links import ProbeConfig
    from swarm.localswarm import LocalSwarm
    from swarm.bench.pipeline import bench_prompts
    from swarm.model.units import ModelLayout
    from swarm.source import SourceConfig, SwarmSource

    torch.set_num_threads(1)
    new_tokens = max(new_tokens, 2 * KILL_AT_TOKEN)  # the loss lands mid-answer however short the answers
    max_len = prompt_tokens + new_tokens
    prompt = bench_prompts(1, prompt_tokens, ModelLayout.read(model_dir).vocab_size)[0]
    runs: list[RecoveryRun] = []
    local = LocalSwarm.for_model(model_dir, 3, max_len=max_len,
                                 extra_args=("--heartbeat", str(liveness.interval_s), "--probe-interval", "60"))
    async with local:
        # speculate off: a loss is timed to the next token, and verify steps deliver tokens in bursts
        config = SourceConfig(model=model_dir, name="source", max_len=max_len, liveness=liveness, speculate="off",
                              probe=ProbeConfig(interval_s=60), seed_refresh_s=0.5, **local.source_settings())
        async with SwarmSource(config) as source:
            for run in range(repeats):
                for loss in LOSSES:
                    figures, victim = await _lose_one(source, local, loss, prompt, new_tokens)
                    runs.append(figures)
                    report(f"run {run + 1}, {loss}: to next token {figures.kill_to_next_token_s:.2f} s (detection "
                           f"{figures.detection_s:.2f} s, re-plan + deploy {figures.replan_deploy_s:.2f} s, replay "
                           f"{figures.replay_s:.2f} s)")
                    local.kill(victim)  # a frozen one too: it must not come back as the same member
                    await local.restart(victim)
                    # back, and its links measured: a re-plan for links measured later would
                    # switch the plan mid-answer, and the next loss could miss the answer's stages;
                    # and warm, as a spare peer that has been up a while is (a LOAD to a peer still
                    # warming up waits behind it: up to 1.4 s in a run that did not wait)
                    async with asyncio.timeout(60):
                        while (len(source.state().announcements) < 3 or not source.links_complete()
                               or not all(s.get("warm") for s in (await source.peer_counters(5.0)).values())):
                            await asyncio.sleep(0.1)

    def median(key: str, loss: str = "kill") -> float:
        return statistics.median(getattr(r, key) for r in runs if r.loss == loss)

    def after_detection(loss: str) -> float:
        return statistics.median(r.kill_to_next_token_s - r.detection_s for r in runs if r.loss == loss)

    return RecoveryFigures(
        median("kill_to_next_token_s"), median("detection_s"), median("replan_deploy_s"), median("replay_s"),
        after_detection("kill"), liveness.drop_bound_s, median("kill_to_next_token_s", "freeze"),
        median("detection_s", "freeze"), after_detection("freeze"), runs,
        {"model": model_dir.name, "repeats": repeats, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
         "kill_at_token": KILL_AT_TOKEN, "liveness": asdict(liveness)})


async def _lose_one(source, local, loss: str, prompt: list[int], new_tokens: int) -> tuple[RecoveryRun, int]:
    """One answer, whose last stage's peer is lost at token KILL_AT_TOKEN; the run's figures
    and that peer's index."""
    await source.deploy()
    lost_at = next_at = None
    async for count, token in _counted(source.generate(prompt, new_tokens)):
        if count == KILL_AT_TOKEN:
            # the plan as it is now: a peer restarted by the last run may have moved it
            last = source.current.stages[-1].address
            victim = next(i for i, p in enumerate(local.peers) if p.address == last)
            local.kill(victim) if loss == "kill" else local.freeze(victim)
            lost_at = time.monotonic()
        elif lost_at is not None and next_at is None:
            next_at = time.monotonic()
    # the recovery this loss caused (a re-plan as the restarted peer came back is another)
    # (by time, not by index: the source keeps only its last RECOVERIES_KEPT events)
    event = next((e for e in source.state().recoveries if e.detected_at >= lost_at), None)
    if event is None:
        raise RuntimeError(f"losing {last} (the last stage, {loss}) started no recovery")
    if event.error is not None:
        raise RuntimeError(f"recovery failed: {event.error}")
    return RecoveryRun(loss, next_at - lost_at, event.detected_at - lost_at, event.redeploy_s, event.replay_s,
                       event.peers), victim


async def _counted(tokens):
    count = 0
    async for token in tokens:
        count += 1
        yield count, token
