"""Recovery from a lost peer, measured: the `recovery` part of `swarm bench`.

A source and 3 local peers (any two hold the model); one sequence generates; at its
20th token the peer holding the last stage gets SIGKILL. Measured per run, from the kill:
detection (the directory dropping the peer: at once when its connections close,
within the heartbeat bound only for a frozen one), re-plan + deploy, replay (the
sequence's whole history as one prefill), and the kill to the next token the stream
yields. The killed peer is restarted between runs; medians over the runs are reported.
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


@dataclass(frozen=True)
class RecoveryRun:
    kill_to_next_token_s: float
    detection_s: float  # kill -> the source's detection
    replan_deploy_s: float  # detection -> the new deployment ready
    replay_s: float  # new deployment -> the first token after it
    peers_after: int


@dataclass(frozen=True)
class RecoveryFigures:
    """Medians over the runs, and the bound detection must stay within."""

    kill_to_next_token_s: float
    detection_s: float
    replan_deploy_s: float
    replay_s: float
    detection_to_next_token_s: float
    heartbeat_bound_s: float  # LivenessConfig.drop_bound_s of the source
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
    max_len = prompt_tokens + new_tokens
    prompt = bench_prompts(1, prompt_tokens, ModelLayout.read(model_dir).vocab_size)[0]
    runs: list[RecoveryRun] = []
    local = LocalSwarm.for_model(model_dir, 3, max_len=max_len,
                                 extra_args=("--heartbeat", str(liveness.interval_s), "--probe-interval", "60"))
    async with local:
        config = SourceConfig(model=model_dir, name="source", max_len=max_len, liveness=liveness,
                              probe=ProbeConfig(interval_s=60), seed_refresh_s=0.5, **local.source_settings())
        async with SwarmSource(config) as source:
            for run in range(repeats):
                await source.deploy()
                before = len(source.state().recoveries)
                killed_at = next_at = None
                # the kill lands mid-answer however short the benchmark's answers are
                async for count, token in _counted(source.generate(prompt, max(new_tokens, 2 * KILL_AT_TOKEN))):
                    if count == KILL_AT_TOKEN:
                        # the plan as it is now: a peer restarted by the last run may have moved it
                        last = source.current.stages[-1].address
                        victim = next(i for i, p in enumerate(local.peers) if p.address == last)
                        local.kill(victim)
                        killed_at = time.monotonic()
                    elif killed_at is not None and next_at is None:
                        next_at = time.monotonic()
                # the recovery this kill caused (a re-plan as the restarted peer came back is another)
                event = next((e for e in source.state().recoveries[before:] if e.detected_at >= killed_at), None)
                if event is None:
                    raise RuntimeError(f"killing {last} (the last stage) started no recovery")
                if event.error is not None:
                    raise RuntimeError(f"recovery failed: {event.error}")
                figures = RecoveryRun(next_at - killed_at, event.detected_at - killed_at, event.redeploy_s,
                                      event.replay_s, event.peers)
                runs.append(figures)
                report(f"run {run + 1}: kill to next token {figures.kill_to_next_token_s:.2f} s (detection "
                       f"{figures.detection_s:.2f} s, re-plan + deploy {figures.replan_deploy_s:.2f} s, replay "
                       f"{figures.replay_s:.2f} s)")
                await local.restart(victim)
                async with asyncio.timeout(60):
                    while len(source.state().announcements) < 3:
                        await asyncio.sleep(0.1)

    def median(key: str) -> float:
        return statistics.median(getattr(r, key) for r in runs)

    return RecoveryFigures(
        median("kill_to_next_token_s"), median("detection_s"), median("replan_deploy_s"), median("replay_s"),
        statistics.median(r.kill_to_next_token_s - r.detection_s for r in runs), liveness.drop_bound_s, runs,
        {"model": model_dir.name, "repeats": repeats, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
         "kill_at_token": KILL_AT_TOKEN, "liveness": asdict(liveness)})


async def _counted(tokens):
    count = 0
    async for token in tokens:
        count += 1
        yield count, token
