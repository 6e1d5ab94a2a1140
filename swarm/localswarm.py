"""The swarm on this machine alone.

- ``ChainEngine``: the single-process chain of shards (swarm.model.local) behind
  the chat's TokenEngine interface, with per-stage timings for the topology view.
- ``LocalSwarm``: N peer processes on 127.0.0.1, each with a memory budget small
  enough that the planner must split the model across them; stopped on exit, and
  killed by the kernel if this process dies first (no peer is ever left behind).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import psutil

from swarm.model.local import LocalChain
from swarm.model.sampling import GREEDY, SamplingParams
from swarm.view.snapshot import PeerState, PlanState, StageState, SwarmSnapshot

log = logging.getLogger(__name__)


@dataclass
class StageTimer:
    """Busy time of one stage since the engine started."""

    busy_s: float = 0.0
    steps: int = 0
    tokens: int = 0


class ChainEngine:
    """One sequence through a LocalChain, stepped on a worker thread so the loop stays live."""

    def __init__(self, chain: LocalChain, sampling: SamplingParams = GREEDY, slot: int = 0, name: str = "this process"):
        self.chain, self.sampling, self.slot, self.name = chain, sampling, slot, name
        self.prefilled_tokens = 0
        self.generated_tokens = 0
        self.fed: list[int] = []  # every token in the current sequence's cache, in order
        self.timers = [StageTimer() for _ in chain.shards]
        self.started = time.perf_counter()
        self._recent: list[float] = []  # completion times of recent tokens, for tokens/s

    async def reset(self) -> None:
        await asyncio.to_thread(self.chain.open_slot, self.slot, self.sampling)
        self.fed = []

    def _step(self, ids: list[int]) -> int:
        import torch  # the engine is only built where torch is already loaded

        data = torch.tensor([ids], dtype=torch.int64)
        for shard, timer in zip(self.chain.shards, self.timers):
            began = time.perf_counter()
            data = shard.step([self.slot], data)
            timer.busy_s += time.perf_counter() - began
            timer.steps += 1
            timer.tokens += len(ids)
        self.fed.extend(ids)
        return int(data[0])

    async def generate(self, new_ids: list[int], max_new_tokens: int, stop_ids: frozenset[int],
                       stop: asyncio.Event) -> AsyncIterator[int]:
        """See swarm.view.conversation.TokenEngine: the prompt step always runs, so the
        cache holds ``new_ids`` even if ``stop`` was already set."""
        ids = list(new_ids)
        for i in range(max_new_tokens):
            token = await asyncio.to_thread(self._step, ids)
            if i == 0:
                self.prefilled_tokens += len(ids)
            self.generated_tokens += 1
            self._recent = self._recent[-31:] + [time.perf_counter()]
            yield token
            if token in stop_ids or stop.is_set():
                return
            ids = [token]

    def tokens_per_s(self) -> float | None:
        recent = self._recent
        if len(recent) < 2 or time.perf_counter() - recent[-1] > 2.0:
            return None  # idle: no rate to show
        return (len(recent) - 1) / (recent[-1] - recent[0])

    def snapshot(self, model: str) -> SwarmSnapshot:
        """This process as the only peer, each shard a stage."""
        wall = max(time.perf_counter() - self.started, 1e-9)
        used = sum(s.weight_bytes + s.kv_cache_bytes for s in self.chain.shards)
        rate = self.tokens_per_s()
        stages = tuple(
            StageState(self.name if len(self.chain.shards) == 1 else f"{self.name} #{i + 1}", s.start, s.end,
                       busy_share=t.busy_s / wall, tokens_per_s=rate,
                       step_ms=1e3 * t.busy_s / t.steps if t.steps else None, in_flight=None)
            for i, (s, t) in enumerate(zip(self.chain.shards, self.timers)))
        decode = [t.busy_s / t.steps for t in self.timers if t.steps]
        peer = PeerState(self.name, mem_used=used, mem_usable=used + psutil.virtual_memory().available,
                         decode_ms=1e3 * sum(decode) if decode else None, threads=_torch_threads(), last_seen_s=0.0)
        return SwarmSnapshot(
            peers=(peer,), source=self.name, tokens_per_s=rate,
            plan=PlanState(model, self.chain.shards[0].layout.num_units, stages, objective="single process"))


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()
