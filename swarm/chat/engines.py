"""Token engines: one sequence of a model, continued turn by turn, behind the chat.

- ``ChainEngine``: the single-process chain of shards (swarm.model.local), with
  per-stage timings for the topology view.
- ``SwarmEngine``: one pipeline session of the swarm (swarm.source), re-planned
  when peers come or go, with a lost peer reported as an error a person can act on.
- ``SourceView``: copies what a source knows into view snapshots.

Both engines follow swarm.chat.conversation.TokenEngine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import psutil

from swarm.aio import cancel_and_wait
from swarm.chat.conversation import ContextFull
from swarm.model.local import LocalChain
from swarm.model.sampling import GREEDY, SamplingParams
from swarm.view.snapshot import PeerState, PlanState, StageState, SwarmSnapshot

log = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """Something a person can act on: no peers, not enough memory, a lost peer."""


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
        self._unfed: list[int] = []  # the last token of the previous turn, fed first in the next
        self.timers = [StageTimer() for _ in chain.shards]
        self.started = time.perf_counter()
        self._recent: list[float] = []  # completion times of recent tokens, for tokens/s

    async def reset(self) -> None:
        await asyncio.to_thread(self.chain.open_slot, self.slot, self.sampling)
        self.fed, self._unfed = [], []

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
        """See swarm.chat.conversation.TokenEngine: the prompt step always runs, so the
        cache holds ``new_ids`` even if ``stop`` was already set."""
        ids = self._unfed + list(new_ids)
        room = self.chain.shards[0].max_len - len(self.fed)
        if len(ids) + max_new_tokens - 1 > room:
            raise ContextFull(f"this turn needs {len(ids) + max_new_tokens - 1} cache positions, "
                              f"{room} are left")
        self._unfed = []
        for i in range(max_new_tokens):
            token = await asyncio.to_thread(self._step, ids)
            if i == 0:
                self.prefilled_tokens += len(ids)
            self.generated_tokens += 1
            self._recent = self._recent[-31:] + [time.perf_counter()]
            self._unfed = [token]
            yield token
            if token in stop_ids or stop.is_set():
                return
            ids, self._unfed = [token], []

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

        async def next_token():
            return await anext(tokens, None)

        step = asyncio.create_task(next_token())  # owned here: ended in `finally` below
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
            # Cancelling the pending anext() ends the runtime's generator (and its turn),
            # so it is not still running when closed.
            await cancel_and_wait(step)


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
