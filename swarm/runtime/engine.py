"""The source's pipeline: a deployment, the sessions on it, and the step loop.

    config = PipelineConfig(model_dir, plan, layout=Layout(micro_batches=4, batch_size=2))
    async with Pipeline(config) as pipe:
        async for token in pipe.generate(prompt_ids, max_new_tokens=96):   # one request
            ...
        async with await pipe.open_session(sampling) as chat:              # multi-turn
            async for token in chat.generate(turn_ids, max_new_tokens=200):
                ...
            async for token in chat.generate(next_turn_ids, max_new_tokens=200):  # reuses the KV cache
                ...

Who does what, all on the event loop:

- ``Pipeline`` (here): the deployment's lifetime (deploy, redeploy, switch), the KV
  slots (``open_session``), and the step loop: launch every micro-batch step the
  schedule allows, and hand each token that comes back to its session.
- ``Session`` (swarm.runtime.session): one sequence and its turn; the turn's states
  and transitions are the pure table of ``swarm.runtime.turns``.
- the decisions (what to launch, with which rows): ``swarm.runtime.schedule``.
- losing a stage and going on: ``swarm.runtime.recovery``; statistics: ``swarm.runtime.stats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Collection, Coroutine, Sequence

from swarm.model.sampling import GREEDY, SamplingParams, row_sampling
from swarm.model.shard import Shard
from swarm.model.units import ModelLayout
from swarm.runtime.client import PeerError, PeerRefused
from swarm.runtime.deploy import Deployment, StagePlacement, check_plan
from swarm.runtime.recovery import Recovery, RecoveryEvent, Replan, StageLost
from swarm.runtime.schedule import Layout, Mode, choose_slot, replay_skips
from swarm.runtime.session import Session
from swarm.runtime.speculate import DraftLength, Drafter, LookupDrafter, Speculation, SpeculationStats, Speculator
from swarm.runtime.stats import StageCounters, StageStats
from swarm.runtime.steps import StepLoop
from swarm.runtime.turns import TurnEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineConfig:
    model_dir: Path
    plan: tuple[StagePlacement, ...]
    layout: Layout = Layout()
    mode: Mode = Mode.NO_BUBBLES
    max_len: int = 512  # KV cache positions per slot (prompt + every turn + generated)
    dtype: str = "float32"
    quant: str | None = None  # int8 | int4 weights, in this process and on every peer
    # A step not back within this counts as a lost stage (a peer frozen or its link gone):
    # recovery starts. The owner's heartbeats usually see the loss first.
    step_timeout_s: float = 30.0
    control_timeout_s: float = 10.0  # OPEN / CLOSE / UNLOAD replies
    recovery_attempts: int = 3  # re-plan + deploy tries before every running turn fails
    # Speculative decoding (swarm.runtime.speculate): drafts by prompt lookup ("ngram") or by a
    # draft model (Pipeline's ``drafter``), verified k + 1 at a time with exactly the plain tokens.
    speculate: Speculation = Speculation.OFF
    max_draft: int = 8  # drafts per step at most (adaptive k stays within it)


def kept_in_place(old: Sequence[StagePlacement], new: Sequence[StagePlacement]) -> frozenset[str]:
    """The peers that hold the same units in both plans: the new deployment's LOAD keeps their
    weights (the peer sees the same request and re-hosts its shard), so the old one must not
    unload them."""
    return frozenset(s.address for s in set(old[1:]) & set(new[1:]))


class Pipeline:
    """A deployment plus the scheduler. ``async with`` deploys; exit tears down (idempotent).

    ``replan``: called with the suspected stage addresses after a loss; returns the plan
    to recover on (None: a lost stage fails the running turns with StageLost).
    ``on_recovery``: told of every recovery, successful or not.
    ``first_shard``: the source's stage of the config's plan, already loaded by the caller
    (on a device of its choosing, with ``layout.slots`` slots and ``max_len``); the first
    deployment takes it instead of loading its own.
    ``drafter``: makes each session's ``Drafter`` when ``config.speculate`` is MODEL
    (swarm.model.draft); lookup needs none. The pipeline owns it from then on: its ``close()``,
    if it has one, is called when the pipeline closes (the draft model's thread ends).
    """

    def __init__(self, config: PipelineConfig, replan: Replan | None = None,
                 on_recovery: Callable[[RecoveryEvent], None] | None = None, *,
                 first_shard: Shard | None = None, drafter: Callable[[int], Drafter] | None = None) -> None:
        if config.speculate is Speculation.MODEL and drafter is None:
            raise ValueError("speculating with a draft model needs its drafter")
        self.config = config
        self._drafter = drafter
        # A step's cost by width relative to width 1 (the plan's figure, set by the owner):
        # caps each new sequence's drafts (speculate.best_draft). None: adaptive k alone.
        self.step_costs: tuple[float, ...] | None = None
        self._first_shard = first_shard
        self.layout = config.layout
        self.mode = config.mode  # may be switched between steps (the benchmark compares both)
        self.deployment: Deployment | None = None
        self._recovery = Recovery(self, replan, on_recovery or (lambda event: None), config.recovery_attempts)
        self._stats = StageCounters()
        self.steps = StepLoop(self, self._stats, lambda reason: self.stage_lost((), reason),
                              self._recovery.token_landed)
        self._stack: contextlib.AsyncExitStack | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._seqs: dict[int, Session] = {}  # slot -> open session
        self._loading: tuple[asyncio.Future, frozenset[str]] | None = None  # a deployment loading, its peers
        self._slot_freed = asyncio.Condition()
        self._control = asyncio.Lock()  # OPEN / CLOSE / redeploy, in order
        # Deployments closing in the background (a load given up, one replaced mid-switch):
        # closing the pipeline waits for them, so no shard thread or socket outlives it.
        self._closing: set[asyncio.Task] = set()

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Pipeline:
        self._stack = contextlib.AsyncExitStack()
        try:
            self._tg = await self._stack.enter_async_context(asyncio.TaskGroup())
            shard, self._first_shard = self._first_shard, None
            self.deployment = await self._recovery.first_deployment(self.config.plan, shard)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._stack is None:
            return
        stack, self._stack = self._stack, None
        self._recovery.cancel()
        self.fail_all(RuntimeError("pipeline closed"))
        for seq in self._seqs.values():
            seq.idle.set()
        async with self._slot_freed:  # whoever waits for a slot hears that none will come
            self._slot_freed.notify_all()
        try:
            await stack.aclose()
        finally:
            self.steps.stop()
            if self.deployment is not None:
                await self.deployment.aclose(frozenset(self._recovery.suspects))
                self.deployment = None
            if self._closing:
                await asyncio.gather(*self._closing, return_exceptions=True)
            if (close := getattr(self._drafter, "close", None)) is not None:
                await asyncio.to_thread(close)  # waits out a proposal in hand: off the loop

    def _close_later(self, closing: Coroutine[object, object, object] | asyncio.Task) -> asyncio.Task:
        """Let a deployment close in the background; ``aclose`` waits for it (this pipeline owns
        the task: ``closing`` is a clean-up coroutine, or a load task it gave up)."""
        task = closing if isinstance(closing, asyncio.Task) else asyncio.create_task(closing)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return task

    async def deploy(self, plan: tuple[StagePlacement, ...], kept_shard: Shard | None = None,
                     from_dep: int | None = None) -> Deployment:
        """``plan`` loaded. A stage reported lost meanwhile (``stage_lost``) ends the load at
        once with StageLost: a dead peer never answers its LOAD, and waiting for the LOAD
        timeout would hold everything for minutes. ``from_dep``: the deployment this one replaces
        (its stages kept in place keep their KV slots)."""
        check_plan(plan, ModelLayout.read(self.config.model_dir).num_units)
        loading = asyncio.create_task(Deployment.load(
            self.config.model_dir, plan, slots=self.layout.slots, max_len=self.config.max_len,
            dtype=self.config.dtype, quant=self.config.quant, on_message=self.steps.on_peer_message,
            control_timeout_s=self.config.control_timeout_s, kept_shard=kept_shard, from_dep=from_dep))
        self._loading = (loading, frozenset(s.address for s in plan[1:]))
        try:
            dep = await loading
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # our own owner's cancel, not a loss
                raise
            suspects = ", ".join(sorted(self._recovery.suspects)) or "no reply"
            raise StageLost(f"a stage was lost while loading: {suspects}") from None
        finally:
            self._loading = None
            if not loading.done():  # our owner's cancel ends the load too; its clean-up runs on
                loading.cancel()
                self._close_later(loading)
        try:
            self._stats.restart(await dep.peer_status())
        except BaseException:
            self._close_later(dep.aclose())
            raise
        return dep

    async def redeploy(self, plan: Sequence[StagePlacement]) -> None:
        """Load ``plan`` in place of the current deployment; open sessions continue.

        Steps in flight are forgotten; every sequence's tokens are fed again on the new
        stages (one prefill each) ahead of its next ones."""
        failed = None
        try:
            async with self.paused():
                self.steps.forget()
                await self.switch(tuple(plan), frozenset())
        except (PeerError, TimeoutError, OSError) as exc:
            if isinstance(exc, PeerRefused) or self._recovery.replan is None:
                raise
            failed = exc  # a peer of the new plan lost while it loaded: recover from it below
        finally:
            self.steps.launch()
        if failed is not None:
            self.stage_lost((), f"redeploying: {failed}")

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """No step launches inside (a deployment is being replaced); one control operation at a time."""
        async with self._control:
            self.steps.paused = True
            try:
                yield
            finally:
                self.steps.paused = False

    async def switch(self, plan: tuple[StagePlacement, ...], lost: frozenset[str]) -> tuple[int, ...]:
        """Deploy ``plan`` in place of the current deployment and reopen every session's slot
        there. A stage kept in place (same peer, same units; the source's own when its shard was
        kept) keeps its KV slots; the others open them empty. Each sequence's next step replays
        on each stage only what that stage lacks (``schedule.replay_skips``). Returns, per stage
        of ``plan``, the positions that replay computes for the open sequences. Call it ``paused()``."""
        began = time.perf_counter()
        old, self.deployment = self.deployment, None
        try:
            kept = None if old is None else await old.release_first_stage(plan[0])
        except BaseException:  # cancelled (the pipeline closing): the old one is ours to close
            self._close_later(old.aclose(lost))
            raise
        closed = time.perf_counter()
        # The old deployment closes while the new one loads: its UNLOADs name their deployment,
        # so one that reaches a peer after the new LOAD leaves the new shard alone; and a lost
        # peer's unanswered UNLOAD no longer holds the recovery.
        closing = self._close_later(old.aclose(lost, kept_in_place(old.plan, plan) - lost)) if old is not None else None
        try:
            self.deployment = await self.deploy(plan, kept, None if old is None else old.dep_id)
        finally:
            if closing is not None:
                await closing
        deployed = time.perf_counter()
        await asyncio.gather(*(self.deployment.open_slots([seq.slot], seq.sampling, fresh_only=True)
                               for seq in self._seqs.values()))
        kv_kept = self.deployment.kv_kept
        replayed = [0] * len(plan)
        for seq in self._seqs.values():
            seq.reheld(kv_kept)
            if seq.tokens:
                for i, skip in enumerate(replay_skips(seq.holds, len(seq.tokens))):
                    replayed[i] += len(seq.tokens) - skip
        log.info("switched deployments: old stage stopped in %.2f s (%s), new loaded in %.2f s, "
                 "%d slots opened in %.2f s; KV kept on stages %s; replaying %s positions per stage",
                 closed - began, "its shard kept" if kept else "reloaded", deployed - closed, len(self._seqs),
                 time.perf_counter() - deployed, [i for i, k in enumerate(kv_kept) if k] or "none", replayed)
        return tuple(replayed)

    # ------------------------------------------------------------ sessions

    async def open_session(self, sampling: SamplingParams = GREEDY, *, one_shot: bool = False,
                           speculate: Speculation | None = None) -> Session:
        """A new sequence with its own KV slot; waits while every slot is taken.

        An unseeded sampled sequence gets a random seed here, so a replay after a lost
        stage draws the same tokens. ``speculate``: this sequence's drafting, in place of
        the config's (a draft model only where the pipeline has its drafter)."""
        if not sampling.greedy and sampling.seed is None:
            sampling = dataclasses.replace(sampling, seed=secrets.randbits(63))
        async with self._slot_freed:
            while (slot := choose_slot(self.layout, self._free_slots(), self._seqs)) is None \
                    and self._stack is not None:
                await self._slot_freed.wait()  # woken by a freed slot, or by aclose()
            self.check_usable()
            speculator = self._speculator(slot, self.config.speculate if speculate is None else speculate)
            session = self._seqs[slot] = Session(self, slot, sampling, one_shot, speculator)
        try:
            try:
                async with self._control:
                    self.check_usable()
                    await self.deployment.open_slots([slot], sampling)
            except PeerError as exc:
                # A stage lost under the OPEN: the recovery reopens every registered slot, this one too.
                self.stage_lost((), f"opening slot {slot}: {exc}")
                await self._recovery.wait()
                self.check_usable()
        except BaseException:
            await self.release(session)
            raise
        return session

    def _speculator(self, slot: int, mode: Speculation) -> Speculator | None:
        """A new sequence's drafting (its own adaptive k), or None without speculation."""
        mode = Speculation(mode)
        if mode is Speculation.OFF or self.config.max_draft <= 0:
            return None
        if mode is Speculation.MODEL and self._drafter is None:
            raise ValueError("this pipeline has no draft model")
        drafter = LookupDrafter() if mode is Speculation.NGRAM else self._drafter(slot)
        return Speculator(drafter, DraftLength(max_k=self.config.max_draft, costs=self.step_costs))

    @property
    def speculation(self) -> SpeculationStats:
        """Drafts verified and accepted so far (every session of this pipeline)."""
        return self.steps.speculation

    def check_usable(self) -> None:
        if self._stack is None:
            raise RuntimeError("pipeline closed")
        if self._recovery.broken is not None:
            raise self._recovery.broken

    def _free_slots(self) -> list[int]:
        return [s for s in range(self.layout.slots) if s not in self._seqs]

    async def close_slot(self, slot: int) -> None:
        """Free ``slot`` on every stage (a session closing). The slot is reused only after
        every stage freed it, so a later OPEN never races the CLOSE."""
        async with self._control:
            if self.deployment is not None and self._recovery.broken is None:
                await self.deployment.close_slots([slot])

    async def release(self, session: Session) -> None:
        """``session``'s slot is free for another."""
        async with self._slot_freed:
            if self._seqs.get(session.slot) is session:
                del self._seqs[session.slot]
            self._slot_freed.notify_all()

    def fail_all(self, error: BaseException) -> None:
        """Every running turn ends with ``error``."""
        for seq in self._seqs.values():
            seq.apply(TurnEvent.END, error=error)

    async def generate(self, prompt: Sequence[int], max_new_tokens: int, sampling: SamplingParams = GREEDY,
                       stop_ids: Collection[int] = ()) -> AsyncIterator[int]:
        """Stream one request's tokens; its slot is freed as soon as it finishes."""
        session = await self.open_session(sampling, one_shot=True)
        try:
            async for token in session.generate(prompt, max_new_tokens, stop_ids):
                yield token
        finally:
            await session.aclose()  # at once if the turn already closed it

    async def generate_all(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                           sampling: SamplingParams = GREEDY, stop_ids: Collection[int] = ()) -> list[list[int]]:
        """Generated tokens for every prompt, all admitted at once (they share the pipeline).
        A seeded ``sampling`` gives prompt i the seed of row i (``row_sampling``)."""
        async def one(i: int, prompt: Sequence[int]) -> list[int]:
            return [t async for t in self.generate(prompt, max_new_tokens, row_sampling(sampling, i), stop_ids)]

        try:
            async with asyncio.TaskGroup() as tasks:
                runs = [tasks.create_task(one(i, p)) for i, p in enumerate(prompts)]
        except BaseExceptionGroup as group:  # the first failure, as a plain exception (the rest were cancelled)
            raise group.exceptions[0] from None
        return [run.result() for run in runs]

    # ------------------------------------------------------------ losing a stage

    def stage_lost(self, addresses: Collection[str], reason: str) -> None:
        """The owner's word that these stages' peers are gone: recover (in the background)."""
        if self._stack is None or self._recovery.broken is not None:
            return
        self._recovery.suspects |= set(addresses)
        if self.deployment is not None:
            self.deployment.peers_lost(addresses)
        if self._loading is not None and (not addresses or set(addresses) & self._loading[1]):
            self._loading[0].cancel()  # its deploy raises StageLost; whoever deploys re-plans
        self._recovery.start(self._tg, reason)

    # ------------------------------------------------------------ live view

    @property
    def micro_batches_in_flight(self) -> int:
        return self.steps.in_flight

    @property
    def closed(self) -> bool:
        return self._stack is None

    @property
    def sessions(self) -> tuple[Session, ...]:
        return tuple(self._seqs.values())

    @property
    def broken(self) -> bool:
        """A loss could not be recovered from: nothing runs here any more."""
        return self._recovery.broken is not None

    @property
    def recovering(self) -> bool:
        return self._recovery.running

    async def stage_stats(self) -> list[StageStats]:
        """Per-stage busy share, tokens/s and queue since the previous call (or deployment)."""
        dep = self.deployment
        if dep is None or self.recovering:
            return []
        return self._stats.read(dep.plan, await dep.peer_status())
