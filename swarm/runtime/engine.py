"""The source side of collaborative inference: sequences, streaming, the step loop, recovery.

    config = PipelineConfig(model_dir, plan, layout=Layout(micro_batches=4, batch_size=2))
    async with Pipeline(config) as pipe:
        async for token in pipe.generate(prompt_ids, max_new_tokens=96):   # one request
            ...
        async with await pipe.open_session(sampling) as chat:              # multi-turn
            async for token in chat.generate(turn_ids, max_new_tokens=200):
                ...
            async for token in chat.generate(next_turn_ids, max_new_tokens=200):  # reuses the KV cache
                ...

The pipeline alone owns every sequence: its tokens, how many of them the KV cache
holds, its KV slot on every stage and its turn's state (``TurnState``). A
``Session`` is only a handle on one sequence.

A stage lost mid-answer (its peer reported gone by the owner, a step overdue, a
step's error) is the normal path, not a failure: the pipeline stops launching,
forgets the steps in flight, asks its owner for a new plan over the peers still
alive, deploys it, and replays every live sequence's tokens as one prefill per
sequence (batched per micro-batch). Sampling is seeded per (sequence, position),
so the streams go on with the tokens an undisturbed run gives, none lost or repeated.

Decisions (what to launch, with which rows) are the pure functions of
``swarm.runtime.schedule``; this module keeps the state they read and moves steps
and tokens. All state is touched from the event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Collection, Sequence

import torch
import zmq

from swarm.aio import wait_event
from swarm.model.sampling import GREEDY, SamplingParams
from swarm.model.shard import Shard
from swarm.model.units import ModelLayout
from swarm.runtime.client import PeerError, PeerRefused
from swarm.runtime.deploy import Deployment, StagePlacement, check_plan
from swarm.runtime.schedule import (ContextFull, Layout, Mode, build_step, check_turn_fits, choose_slot,
                                    groups_to_launch, turn_finished)
from swarm.runtime.wire import Kind, Message

log = logging.getLogger(__name__)

_END = object()  # end of a turn's token stream


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


class TurnState(enum.Enum):
    """Where one sequence is. IDLE -> WAITING (a turn starts) -> IN_FLIGHT (its micro-batch
    launched) -> WAITING (token back, more to come) or IDLE (turn over); cancel while
    IN_FLIGHT -> CANCELLING (the token in flight will be dropped) -> IDLE; CLOSED is final."""

    IDLE = "idle"
    WAITING = "waiting"
    IN_FLIGHT = "in flight"
    CANCELLING = "cancelling"
    CLOSED = "closed"


class StageLost(PeerError):
    """A stage was lost and the pipeline could not recover (the message says why)."""


@dataclass(frozen=True)
class Replanned:
    """A new plan from the pipeline's owner after a loss, and the peers it gave up."""

    stages: tuple[StagePlacement, ...]
    lost: tuple[str, ...] = ()  # names of the peers no longer in the plan


Replan = Callable[[frozenset[str]], Awaitable[Replanned]]  # suspected addresses -> new plan (or StageLost)


@dataclass(frozen=True)
class RecoveryEvent:
    """One recovery from a lost stage, with where its time went."""

    lost: tuple[str, ...]  # peers given up (names where the owner knows them, else addresses)
    peers: int  # peers in the new plan (the source not counted)
    detection_s: float  # from the oldest step that never came back (or the report) to detection
    redeploy_s: float  # re-plan + deploy + slots reopened
    replay_s: float  # from the new deployment to the first token after it (the replayed prefill)
    sequences: int  # live sequences replayed
    error: str | None = None  # set when recovery failed (every running turn failed with it)
    detected_at: float = 0.0  # time.monotonic() of the detection (benchmarks measure from a kill)

    def describe(self) -> str:
        who = ", ".join(self.lost) or "a stage"
        if self.error is not None:
            return f"peer {who} lost; recovery failed: {self.error}"
        return f"peer {who} lost; re-planned over {self.peers} peer{'s' if self.peers != 1 else ''} in " \
               f"{self.redeploy_s + self.replay_s:.1f} s"


@dataclass(frozen=True)
class StageStats:
    """One stage over the interval since the previous ``stage_stats()`` call."""

    address: str | None  # None: the source process
    start: int
    end: int
    busy_share: float  # fraction of the interval the shard computed (torch time only)
    tokens_per_s: float  # token positions computed per second
    steps_per_s: float
    queued: int  # steps waiting at this stage (micro-batches queued there)


@dataclass
class _Turn:
    max_new_tokens: int
    stop_ids: frozenset[int]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # tokens, then _END or an exception
    generated: int = 0


@dataclass
class _Sequence:
    """One sequence, written by the Pipeline only."""

    slot: int
    sampling: SamplingParams
    one_shot: bool
    tokens: list[int] = field(default_factory=list)  # everything fed or sampled, in order
    cached: int = 0  # how many of ``tokens`` the KV cache of the current deployment holds
    fed: int = 0  # tokens run through the model for this sequence (replays included)
    state: TurnState = TurnState.IDLE
    turn: _Turn | None = None
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # no step of this sequence in flight


@dataclass(frozen=True)
class _Flight:
    step: int
    slots: tuple[int, ...]
    launched: float  # time.monotonic()
    overdue: asyncio.TimerHandle


class Session:
    """A handle on one sequence of a Pipeline, holding one KV slot across turns until ``aclose()``.

    The token sampled last in a turn is fed at the start of the next one, so a new turn
    computes only its new tokens (and the one sampled last).
    """

    def __init__(self, pipeline: "Pipeline", seq: _Sequence) -> None:
        self._pipeline, self._seq = pipeline, seq

    @property
    def history(self) -> tuple[int, ...]:
        """Every token of the sequence: prompts, turns and sampled tokens, in order."""
        return tuple(self._seq.tokens)

    @property
    def fed_tokens(self) -> int:
        """Tokens this sequence has run through the model (a replay after a lost stage counts)."""
        return self._seq.fed

    @property
    def state(self) -> TurnState:
        return self._seq.state

    @property
    def sampling(self) -> SamplingParams:
        return self._seq.sampling

    async def __aenter__(self) -> "Session":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def generate(self, new_tokens: Sequence[int], max_new_tokens: int,
                 stop_ids: Collection[int] = ()) -> AsyncIterator[int]:
        """Feed ``new_tokens`` and stream up to ``max_new_tokens`` sampled tokens; the stop
        token, if hit, is the last one yielded. Raises ContextFull before computing when the
        turn cannot fit the slot. Leaving the iteration early cancels the turn."""
        return self._pipeline._run_turn(self._seq, list(new_tokens), max_new_tokens, frozenset(stop_ids))

    def cancel(self) -> None:
        """End the running turn now; a token still in flight is dropped when it lands."""
        self._pipeline._cancel(self._seq)

    async def aclose(self) -> None:
        """Free the slot on every stage; safe to call twice."""
        await self._pipeline._close_sequence(self._seq)


class Pipeline:
    """A deployment plus the scheduler. ``async with`` deploys; exit tears down (idempotent).

    ``replan``: called with the suspected stage addresses after a loss; returns the plan
    to recover on (None: a lost stage fails the running turns with StageLost).
    ``on_recovery``: told of every recovery, successful or not.
    """

    def __init__(self, config: PipelineConfig, replan: Replan | None = None,
                 on_recovery: Callable[[RecoveryEvent], None] | None = None) -> None:
        self.config = config
        self.layout = config.layout
        self.mode = config.mode  # may be switched between steps (the benchmark compares both)
        self.deployment: Deployment | None = None
        self._replan = replan
        self._on_recovery = on_recovery or (lambda event: None)
        self._stack: contextlib.AsyncExitStack | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._first_stage_queued = 0  # steps submitted to this process's torch thread, not yet done
        self._seqs: dict[int, _Sequence] = {}  # slot -> open sequence
        self._flights: dict[int, _Flight] = {}  # micro-batch -> step in flight
        self._next_step = 1
        self._paused = False
        self._broken: StageLost | None = None  # recovery failed: nothing runs any more
        self._suspects: set[str] = set()  # stage addresses reported lost, not yet replaced
        self._starting = False  # the first deployment is loading (it re-plans on a loss itself)
        self._loading: tuple[asyncio.Future, frozenset[str]] | None = None  # a deployment loading, its peers
        self._recovery: asyncio.Task | None = None
        self._fruitless_recoveries = 0  # recoveries since the last token: a step that fails every time ends it
        self._replaying: tuple[float, RecoveryEvent] | None = None  # waiting for the first token after one
        self._slot_freed = asyncio.Condition()
        self._control = asyncio.Lock()  # OPEN / CLOSE / redeploy, in order
        self._local = {"busy_s": 0.0, "steps": 0, "tokens": 0}
        self._last_stats: tuple[float, list[dict]] | None = None

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> "Pipeline":
        self._stack = contextlib.AsyncExitStack()
        try:
            self._tg = await self._stack.enter_async_context(asyncio.TaskGroup())
            self._starting = True
            self.deployment = await self._first_deployment()
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
        if self._recovery is not None:
            self._recovery.cancel()
        self._fail_all(RuntimeError("pipeline closed"))
        for seq in self._seqs.values():
            seq.idle.set()
        async with self._slot_freed:  # whoever waits for a slot hears that none will come
            self._slot_freed.notify_all()
        try:
            await stack.aclose()
        finally:
            for flight in self._flights.values():
                flight.overdue.cancel()
            self._flights.clear()
            if self.deployment is not None:
                await self.deployment.aclose(frozenset(self._suspects))
                self.deployment = None

    async def _first_deployment(self) -> Deployment:
        """The config's plan, loaded. A peer lost while it loads (or that never answers) is
        a loss like any other: re-plan over the peers still alive and load again."""
        plan = self.config.plan
        try:
            for attempt in range(1, self.config.recovery_attempts + 1):
                try:
                    return await self._deploy(plan)
                except PeerRefused:
                    raise  # a live peer said no (other weights, a bad request): another plan would not help
                except (PeerError, TimeoutError, OSError) as exc:
                    if self._replan is None or attempt == self.config.recovery_attempts:
                        raise
                    detected = time.monotonic()
                    log.warning("deploying failed (%s): re-planning", exc)
                    replanned = await self._replan(frozenset(self._suspects))
                    self._suspects.clear()
                    plan = replanned.stages
                    self._on_recovery(RecoveryEvent(replanned.lost, len(plan) - 1, 0.0,
                                                    time.monotonic() - detected, 0.0, 0, detected_at=detected))
            raise AssertionError("unreachable")
        finally:
            self._starting = False

    async def _deploy(self, plan: tuple[StagePlacement, ...], kept_shard: Shard | None = None) -> Deployment:
        """``plan`` loaded. A stage reported lost meanwhile (``stage_lost``) ends the load at
        once with StageLost: a dead peer never answers its LOAD, and waiting for the LOAD
        timeout would hold everything for minutes."""
        check_plan(plan, ModelLayout.read(self.config.model_dir).num_units)
        loading = asyncio.create_task(Deployment.load(
            self.config.model_dir, plan, slots=self.layout.slots, max_len=self.config.max_len,
            dtype=self.config.dtype, quant=self.config.quant, on_message=self._on_peer_message,
            control_timeout_s=self.config.control_timeout_s, kept_shard=kept_shard))
        self._loading = (loading, frozenset(s.address for s in plan[1:]))
        try:
            dep = await loading
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # our own owner's cancel, not a loss
                raise
            raise StageLost(f"a stage was lost while loading: {', '.join(sorted(self._suspects)) or 'no reply'}") \
                from None
        finally:
            self._loading = None
            loading.cancel()  # a no-op once it is done; our owner's cancel ends the load too
        local = {**self._local, "queued": 0}
        self._last_stats = (time.perf_counter(), [local, *await dep.peer_status()])
        return dep

    async def redeploy(self, plan: Sequence[StagePlacement]) -> None:
        """Load ``plan`` in place of the current deployment; open sessions continue.

        Steps in flight are forgotten; every sequence's tokens are fed again on the new
        stages (one prefill each) ahead of its next ones."""
        async with self._control:
            self._paused = True
            try:
                self._forget_flights()
                await self._switch(tuple(plan), frozenset())
            except (PeerError, TimeoutError, OSError) as exc:
                if isinstance(exc, PeerRefused) or self._replan is None:
                    raise
                failed = exc  # a peer of the new plan lost while it loaded: recover from it below
            else:
                failed = None
            finally:
                self._paused = False
                self._launch()
        if failed is not None:
            self.stage_lost((), f"redeploying: {failed}")

    async def _switch(self, plan: tuple[StagePlacement, ...], lost: frozenset[str]) -> None:
        began = time.perf_counter()
        old, self.deployment = self.deployment, None
        kept = None if old is None else await old.release_first_stage(plan[0])
        closed = time.perf_counter()
        # The old deployment closes while the new one loads: its UNLOADs name their deployment,
        # so one that reaches a peer after the new LOAD leaves the new shard alone; and a lost
        # peer's unanswered UNLOAD no longer holds the recovery.
        closing = asyncio.create_task(old.aclose(lost)) if old is not None else None
        try:
            self.deployment = await self._deploy(plan, kept)
        finally:
            if closing is not None:
                await closing
        deployed = time.perf_counter()
        await asyncio.gather(*(self.deployment.open_slots([seq.slot], seq.sampling) for seq in self._seqs.values()))
        log.info("switched deployments: old stage stopped in %.2f s (%s), new loaded in %.2f s, "
                 "%d slots opened in %.2f s", closed - began, "its shard kept" if kept else "reloaded",
                 deployed - closed, len(self._seqs), time.perf_counter() - deployed)
        for seq in self._seqs.values():
            seq.cached = 0  # the new stages hold nothing: the next step replays the whole sequence

    # ------------------------------------------------------------ sequences

    async def open_session(self, sampling: SamplingParams = GREEDY, *, one_shot: bool = False) -> Session:
        """A new sequence with its own KV slot; waits while every slot is taken.

        An unseeded sampled sequence gets a random seed here, so a replay after a lost
        stage draws the same tokens."""
        if not sampling.greedy and sampling.seed is None:
            sampling = SamplingParams(sampling.temperature, sampling.top_k, sampling.top_p, secrets.randbits(63))
        async with self._slot_freed:
            while (slot := choose_slot(self.layout, self._free_slots(), self._seqs)) is None \
                    and self._stack is not None:
                await self._slot_freed.wait()  # woken by a freed slot, or by aclose()
            self._check_usable()
            seq = self._seqs[slot] = _Sequence(slot, sampling, one_shot)
            seq.idle.set()
        try:
            try:
                async with self._control:
                    self._check_usable()
                    await self.deployment.open_slots([slot], sampling)
            except PeerError as exc:
                # A stage lost under the OPEN: the recovery reopens every registered slot, this one too.
                self.stage_lost((), f"opening slot {slot}: {exc}")
                if self._recovery is not None:
                    await asyncio.wait({self._recovery})  # not `await task`: leaving here must not cancel it
                self._check_usable()
        except BaseException:
            await self._free(seq)
            raise
        return Session(self, seq)

    def _check_usable(self) -> None:
        if self._stack is None:
            raise RuntimeError("pipeline closed")
        if self._broken is not None:
            raise self._broken

    def _free_slots(self) -> list[int]:
        return [s for s in range(self.layout.slots) if s not in self._seqs]

    async def _run_turn(self, seq: _Sequence, new_tokens: list[int], max_new_tokens: int,
                       stop_ids: frozenset[int]) -> AsyncIterator[int]:
        """Session.generate (Session is this pipeline's handle, in this module): one turn of ``seq`` as a stream of tokens."""
        if seq.state is TurnState.CANCELLING:  # the last turn's cancelled step has not landed yet
            await wait_event(seq.idle, self.config.step_timeout_s)
        if seq.state is TurnState.CLOSED:
            raise RuntimeError("session is closed")
        if seq.state is not TurnState.IDLE:
            raise RuntimeError("a turn is already running in this session")
        self._check_usable()
        if max_new_tokens < 1 or not (new_tokens or len(seq.tokens) > seq.cached):
            raise ValueError("a turn needs at least one token to feed and max_new_tokens >= 1")
        check_turn_fits(len(seq.tokens) + len(new_tokens), max_new_tokens, self.config.max_len)
        seq.tokens += new_tokens
        turn = seq.turn = _Turn(max_new_tokens, stop_ids)
        seq.state = TurnState.WAITING
        self._launch()
        try:
            while (item := await turn.queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if seq.turn is turn:  # the consumer left early: nothing more is computed for it
                self._end_turn(seq)
            if seq.one_shot:
                await self._close_sequence(seq)

    def _cancel(self, seq: _Sequence) -> None:
        self._end_turn(seq)

    def _end_turn(self, seq: _Sequence, error: BaseException | None = None) -> None:
        """The turn's stream ends now (with ``error``, if given). A step still in flight
        leaves the sequence CANCELLING until it lands or is forgotten; its token is dropped."""
        if seq.turn is None:
            return
        turn, seq.turn = seq.turn, None
        turn.queue.put_nowait(_END if error is None else error)
        if seq.state is TurnState.WAITING:
            seq.state = TurnState.IDLE
        elif seq.state is TurnState.IN_FLIGHT:
            seq.state = TurnState.CANCELLING

    def _fail_all(self, error: BaseException) -> None:
        for seq in self._seqs.values():
            self._end_turn(seq, error)

    async def _close_sequence(self, seq: _Sequence) -> None:
        if seq.state is TurnState.CLOSED:
            return
        self._end_turn(seq)
        cancelling = seq.state is TurnState.CANCELLING
        seq.state = TurnState.CLOSED  # a token still in flight is dropped when it lands
        try:
            if cancelling:  # let the step land (or be forgotten) before the slot is freed
                await wait_event(seq.idle, self.config.step_timeout_s)
            # The slot is reused only after every stage freed it, so a later OPEN never races the CLOSE.
            async with self._control:
                if self.deployment is not None and self._broken is None:
                    await self.deployment.close_slots([seq.slot])
        except Exception as exc:  # cleanup: a failure here must not cancel whoever owns the TaskGroup
            log.warning("closing slot %d: %s", seq.slot, exc)
        finally:
            await self._free(seq)

    async def _free(self, seq: _Sequence) -> None:
        async with self._slot_freed:
            if self._seqs.get(seq.slot) is seq:
                del self._seqs[seq.slot]
            self._slot_freed.notify_all()

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
        A seeded ``sampling`` gives prompt i the seed ``seed + i``."""
        async def one(i: int, prompt: Sequence[int]) -> list[int]:
            own = sampling if sampling.seed is None else SamplingParams(
                sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed + i)
            return [t async for t in self.generate(prompt, max_new_tokens, own, stop_ids)]

        try:
            async with asyncio.TaskGroup() as tasks:
                runs = [tasks.create_task(one(i, p)) for i, p in enumerate(prompts)]
        except BaseExceptionGroup as group:  # the first failure, as a plain exception (the rest were cancelled)
            raise group.exceptions[0] from None
        return [run.result() for run in runs]

    # ------------------------------------------------------------ the step loop

    def _launch(self) -> None:
        """Start every micro-batch step the schedule allows now."""
        if self._paused or self.deployment is None or self._stack is None:
            return
        waiting = [s for s in self._seqs.values() if s.state is TurnState.WAITING]
        ready = {self.layout.group_of(s.slot) for s in waiting}
        loop = asyncio.get_running_loop()
        for group in groups_to_launch(self.mode, ready, self._flights.keys()):
            rows = {s.slot: s.tokens[s.cached:] for s in waiting if self.layout.group_of(s.slot) == group}
            step = build_step(rows)
            for slot in step.slots:
                seq = self._seqs[slot]
                seq.fed += len(seq.tokens) - seq.cached
                seq.cached = len(seq.tokens)
                seq.state = TurnState.IN_FLIGHT
                seq.idle.clear()
            number = self._next_step
            self._next_step += 1
            overdue = loop.call_later(self.config.step_timeout_s, self._overdue, group, number)
            self._flights[group] = _Flight(number, step.slots, time.monotonic(), overdue)
            lengths = None if step.uniform else list(step.lengths)
            tokens = torch.tensor(step.tokens)
            # Straight to the torch thread: the step starts while this loop goes on.
            done = self.deployment.submit_first_stage(group, number, list(step.slots), tokens, lengths)
            self._first_stage_queued += 1
            done.add_done_callback(functools.partial(self._first_stage_done, self.deployment, group, number,
                                                     sum(lengths) if lengths else tokens.numel()))

    def _first_stage_done(self, deployment: Deployment, group: int, step: int, tokens: int,
                          done: asyncio.Future) -> None:
        self._first_stage_queued -= 1
        if deployment is not self.deployment or done.cancelled():  # closed or replaced meanwhile
            return
        error = done.exception()
        if isinstance(error, (zmq.ZMQError, OSError)):  # the next stage's socket gone: a lost stage
            self._step_failed(group, step, f"sending a step failed: {error}")
            return
        if error is not None:  # the shard refused the step: its turns fail, the others go on
            self._fail_flight(group, step, error)
            return
        out, compute_s = done.result()
        self._local["busy_s"] += compute_s
        self._local["steps"] += 1
        self._local["tokens"] += tokens
        if out is not None:  # the source holds the whole model
            self._on_tokens(group, step, out)

    def _on_peer_message(self, message: Message) -> None:
        dep = self.deployment
        if dep is None or message.get("dep") != dep.dep_id:
            log.debug("dropping %s from another deployment", message.kind.value)
        elif message.kind is Kind.TOKENS:
            self._on_tokens(message["mb"], message["step"], message.tensors[0])
        elif message.kind is Kind.ERROR:
            self._step_failed(message["mb"], message["step"], f"a stage failed a step: {message['error']}")

    def _on_tokens(self, group: int, step: int, tokens: torch.Tensor) -> None:
        flight = self._flights.get(group)
        if flight is None or flight.step != step or tokens.shape != (len(flight.slots),):
            log.warning("dropping tokens for micro-batch %d step %d: not in flight", group, step)
            return
        del self._flights[group]
        flight.overdue.cancel()
        self._fruitless_recoveries = 0
        delivered, ended = [], []
        for slot, token in zip(flight.slots, tokens.tolist()):
            seq = self._seqs.get(slot)
            if seq is None:
                continue
            seq.idle.set()
            if seq.state is TurnState.CANCELLING:  # the token of a cancelled turn is dropped
                seq.state = TurnState.IDLE
            if seq.state is not TurnState.IN_FLIGHT:
                continue
            seq.tokens.append(token)
            seq.turn.generated += 1
            delivered.append((seq.turn, token))
            if turn_finished(seq.turn.generated, seq.turn.max_new_tokens, token, seq.turn.stop_ids):
                seq.state = TurnState.IDLE
                ended.append(seq)
            else:
                seq.state = TurnState.WAITING
        # The next step first (No-Bubbles: it starts the moment its token is back), then the
        # consumers, which run while the step computes.
        self._launch()
        for turn, token in delivered:
            turn.queue.put_nowait(token)
        for seq in ended:
            self._end_turn(seq)
        if self._replaying is not None:
            self._recovered()

    def _fail_flight(self, group: int, step: int, error: BaseException) -> None:
        """A step failed here, in the source, for a reason of its own: its turns fail."""
        flight = self._flights.get(group)
        if flight is None or flight.step != step:
            return
        del self._flights[group]
        flight.overdue.cancel()
        for slot in flight.slots:
            if (seq := self._seqs.get(slot)) is not None:
                seq.idle.set()
                if seq.state is TurnState.IN_FLIGHT:
                    seq.state = TurnState.WAITING  # so that ending the turn leaves it IDLE
                self._end_turn(seq, error)
                if seq.state is TurnState.CANCELLING:
                    seq.state = TurnState.IDLE
        self._launch()

    # ------------------------------------------------------------ losing a stage

    def stage_lost(self, addresses: Collection[str], reason: str) -> None:
        """The owner's word that these stages' peers are gone: recover (in the background)."""
        if self._stack is None or self._broken is not None:
            return
        self._suspects |= set(addresses)
        if self._loading is not None and (not addresses or set(addresses) & self._loading[1]):
            self._loading[0].cancel()  # its _deploy raises StageLost; whoever deploys re-plans
        if self._starting:
            return  # the first deployment re-plans on its own
        if self._recovery is None or self._recovery.done():
            log.info("stage lost (%s): recovering", reason)  # the normal path: the owner shows the event
            self._recovery = self._tg.create_task(self._recover(reason, time.monotonic()))

    def _overdue(self, group: int, step: int) -> None:
        flight = self._flights.get(group)
        if flight is not None and flight.step == step:
            self.stage_lost((), f"step {step} not back within {self.config.step_timeout_s} s")

    def _step_failed(self, group: int, step: int, reason: str) -> None:
        flight = self._flights.get(group)
        if flight is not None and flight.step == step:
            self.stage_lost((), reason)

    def _forget_flights(self) -> float:
        """Drop every step in flight (its tokens will never count); returns when the oldest was launched."""
        oldest = min((f.launched for f in self._flights.values()), default=time.monotonic())
        for flight in self._flights.values():
            flight.overdue.cancel()
            for slot in flight.slots:
                seq = self._seqs.get(slot)
                if seq is None:
                    continue
                seq.idle.set()
                if seq.state is TurnState.IN_FLIGHT:
                    seq.state = TurnState.WAITING  # its token is recomputed by the replay
                elif seq.state is TurnState.CANCELLING:
                    self._end_turn(seq)
        self._flights.clear()
        return oldest

    async def _recover(self, reason: str, detected: float) -> None:
        async with self._control:
            self._paused = True
            oldest = self._forget_flights()
            lost: tuple[str, ...] = ()
            self._fruitless_recoveries += 1
            try:
                if self._fruitless_recoveries > self.config.recovery_attempts:
                    raise StageLost(f"{reason}; {self.config.recovery_attempts} recoveries in a row gave no token")
                for attempt in range(1, self.config.recovery_attempts + 1):
                    suspects = frozenset(self._suspects)
                    if self._replan is None:
                        raise StageLost(f"{reason}; this pipeline has no one to re-plan it")
                    asked = time.perf_counter()
                    replanned = await self._replan(suspects)
                    log.info("re-planned in %.2f s", time.perf_counter() - asked)
                    lost = replanned.lost or lost or tuple(sorted(suspects))
                    try:
                        await self._switch(replanned.stages, suspects)
                    except (PeerError, TimeoutError, OSError) as exc:
                        log.warning("recovery attempt %d failed: %s", attempt, exc)
                        continue
                    # The new plan is over the peers live when it was made; one of them reported
                    # lost since means another round.
                    late = (self._suspects - suspects) & {s.address for s in replanned.stages}
                    self._suspects = set(late)
                    if not late:
                        break
                else:
                    raise StageLost(f"{reason}; no deployment held after {self.config.recovery_attempts} tries")
            except Exception as exc:
                self._broken = exc if isinstance(exc, StageLost) else StageLost(f"{reason}: {exc}")
                self._fail_all(self._broken)
                self._on_recovery(RecoveryEvent(lost, 0, detected - oldest, time.monotonic() - detected, 0.0,
                                                len(self._seqs), error=str(self._broken), detected_at=detected))
                return
            finally:
                self._paused = False
            deployed = time.monotonic()
            peers = len(self.deployment.plan) - 1
            event = RecoveryEvent(lost, peers, max(0.0, detected - oldest), deployed - detected, 0.0,
                                  sum(1 for s in self._seqs.values() if s.tokens), detected_at=detected)
            self._replaying = (deployed, event)
            self._launch()
            if not self._flights:  # nothing to replay now: the sequences replay on their next turn
                self._recovered()

    def _recovered(self) -> None:
        deployed, event = self._replaying
        self._replaying = None
        event = dataclasses.replace(event, replay_s=time.monotonic() - deployed if event.sequences else 0.0)
        log.info("%s (detected in %.2f s, redeployed in %.2f s, replayed in %.2f s)", event.describe(),
                    event.detection_s, event.redeploy_s, event.replay_s)
        self._on_recovery(event)

    # ------------------------------------------------------------ live view

    @property
    def micro_batches_in_flight(self) -> int:
        return len(self._flights)

    @property
    def broken(self) -> bool:
        """A loss could not be recovered from: nothing runs here any more."""
        return self._broken is not None

    @property
    def recovering(self) -> bool:
        return self._recovery is not None and not self._recovery.done()

    async def stage_stats(self) -> list[StageStats]:
        """Per-stage busy share, tokens/s and queue since the previous call (or deployment)."""
        dep = self.deployment
        if dep is None or self.recovering:
            return []
        now = time.perf_counter()
        statuses = [{**self._local, "queued": max(0, self._first_stage_queued - 1)}, *await dep.peer_status()]
        prev_t, prev = self._last_stats or (now, [{"busy_s": 0.0, "steps": 0, "tokens": 0}] * len(statuses))
        self._last_stats = (now, statuses)
        span = max(now - prev_t, 1e-9)
        return [
            StageStats(stage.address, stage.start, stage.end, min(1.0, (cur["busy_s"] - old["busy_s"]) / span),
                       (cur["tokens"] - old["tokens"]) / span, (cur["steps"] - old["steps"]) / span, cur["queued"])
            for stage, cur, old in zip(dep.plan, statuses, prev)
        ]
