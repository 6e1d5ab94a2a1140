"""The source side of collaborative inference: sessions, streaming, and the step loop.

    config = PipelineConfig(model_dir, plan, layout=Layout(micro_batches=4, batch_size=2))
    async with Pipeline(config) as pipe:
        async for token in pipe.generate(prompt_ids, max_new_tokens=96):   # one request
            ...
        async with await pipe.open_session(sampling) as chat:              # multi-turn
            async for token in chat.generate(turn_ids, max_new_tokens=200):
                ...
            async for token in chat.generate(next_turn_ids, max_new_tokens=200):  # reuses the KV cache
                ...

Decisions (what to launch, with which rows) are the pure functions of
``swarm.runtime.schedule``; this module only keeps the state they read and moves
steps and tokens. All state is touched from the event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Sequence

import torch

from swarm.aio import wait_event
from swarm.model.sampling import GREEDY, SamplingParams
from swarm.model.units import ModelLayout
from swarm.runtime.client import PeerError
from swarm.runtime.deploy import Deployment, Stage, check_plan
from swarm.runtime.schedule import Layout, Mode, build_step, choose_slot, groups_to_launch, turn_finished
from swarm.runtime.wire import Kind, Message

log = logging.getLogger(__name__)

_END = object()  # end of a turn's token stream


@dataclass(frozen=True)
class PipelineConfig:
    model_dir: Path
    plan: tuple[Stage, ...]
    layout: Layout = Layout()
    mode: Mode = Mode.NO_BUBBLES
    max_len: int = 512  # KV cache positions per slot (prompt + every turn + generated)
    dtype: str = "float32"
    quant: str | None = None  # int8 | int4 weights (issue 15), in this process and on every peer
    # A turn whose next token takes longer than this fails with PeerError (a stage died or
    # hangs); its micro-batch is written off so the rest carry on, and redeploy() can replace the plan.
    token_timeout_s: float = 60.0
    control_timeout_s: float = 10.0  # OPEN / CLOSE / UNLOAD replies


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
    session: "Session"
    pending: list[int]  # tokens to feed in the next step
    max_new_tokens: int
    stop_ids: frozenset[int]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    generated: int = 0
    in_flight: bool = False
    cancelled: bool = False
    done: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class _Flight:
    step: int
    slots: tuple[int, ...]


class Session:
    """One sequence holding one KV slot across turns, until ``aclose()``.

    ``history`` is exactly what the KV cache holds; the token sampled last in a turn
    is fed at the start of the next one, so a new turn computes only its new tokens.
    """

    def __init__(self, pipeline: "Pipeline", slot: int, sampling: SamplingParams, one_shot: bool = False):
        self.slot = slot
        self.sampling = sampling
        self.history: list[int] = []
        self.unfed: list[int] = []
        self.prefilled_tokens = 0  # tokens run through the model for this session
        self._pipeline = pipeline
        self._one_shot = one_shot
        self._turn: _Turn | None = None
        self._closed = False
        self._released = False

    async def __aenter__(self) -> "Session":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def generate(self, new_tokens: Sequence[int], max_new_tokens: int,
                       stop_ids: Sequence[int] = ()) -> AsyncIterator[int]:
        """Stream the next turn's tokens; the stop token, if hit, is the last one yielded."""
        if self._closed:
            raise RuntimeError("session is closed")
        if self._turn is not None and not self._turn.done:
            raise RuntimeError("a turn is already running in this session")
        feed = self.unfed + list(new_tokens)
        if not feed or max_new_tokens < 1:
            raise ValueError("a turn needs at least one token to feed and max_new_tokens >= 1")
        need = len(self.history) + len(feed) + max_new_tokens - 1
        if need > self._pipeline.config.max_len:
            raise ValueError(f"this turn needs {need} cache positions; the slot holds {self._pipeline.config.max_len}")
        self.unfed = []
        turn = self._turn = _Turn(self, feed, max_new_tokens, frozenset(stop_ids))
        self._pipeline._start_turn(turn)
        try:
            while True:
                try:
                    async with asyncio.timeout(self._pipeline.config.token_timeout_s):
                        item = await turn.queue.get()
                except TimeoutError:
                    self._pipeline._expire(turn)
                    continue  # _expire queued the error
                if item is _END:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            if not turn.done:
                self._pipeline._cancel_turn(turn)

    def cancel(self) -> None:
        """Stop the running turn after the step in flight (its token is dropped)."""
        if self._turn is not None and not self._turn.done:
            self._pipeline._cancel_turn(self._turn)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.cancel()
        await self._pipeline._release(self)


class Pipeline:
    """A deployment plus the scheduler. ``async with`` deploys; exit tears down (idempotent)."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.layout = config.layout
        self.mode = config.mode  # may be switched between steps (the benchmark compares both)
        self.deployment: Deployment | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._first_stage_queued = 0  # steps submitted to this process's torch thread, not yet done
        self._turns: dict[int, _Turn] = {}  # slot -> running turn
        self._sessions: dict[int, Session] = {}  # slot -> open session
        self._flights: dict[int, _Flight] = {}  # micro-batch -> step in flight
        self._next_step = 1
        self._paused = False
        self._drained = asyncio.Event()
        self._drained.set()
        self._slot_freed = asyncio.Condition()
        self._control = asyncio.Lock()  # OPEN / CLOSE / redeploy, in order
        self._local = {"busy_s": 0.0, "steps": 0, "tokens": 0}
        self._last_stats: tuple[float, list[dict]] | None = None
        self.tokens_generated = 0

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> "Pipeline":
        self._stack = contextlib.AsyncExitStack()
        try:
            self._tg = await self._stack.enter_async_context(asyncio.TaskGroup())
            self.deployment = await self._deploy(self.config.plan)
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
        for turn in list(self._turns.values()):
            self._finish_turn(turn, RuntimeError("pipeline closed"))
        async with self._slot_freed:  # whoever waits for a slot hears that none will come
            self._slot_freed.notify_all()
        try:
            await stack.aclose()
        finally:
            if self.deployment is not None:
                await self.deployment.aclose()
                self.deployment = None

    async def _deploy(self, plan: tuple[Stage, ...]) -> Deployment:
        check_plan(plan, ModelLayout.read(self.config.model_dir).num_units)
        dep = Deployment(self.config.model_dir, plan, slots=self.layout.slots, max_len=self.config.max_len,
                         dtype=self.config.dtype, quant=self.config.quant, on_message=self._on_peer_message,
                         control_timeout_s=self.config.control_timeout_s)
        await dep.__aenter__()
        local = {**self._local, "queued": 0}
        self._last_stats = (time.perf_counter(), [local, *await dep.peer_status()])
        return dep

    async def redeploy(self, plan: Sequence[Stage]) -> None:
        """Tear the deployment down and load ``plan``; open sessions continue.

        Steps in flight finish first; then every session's KV cache is rebuilt on the
        new stages by feeding its history again, ahead of its next tokens.
        """
        async with self._control:
            self._paused = True
            try:
                if not await wait_event(self._drained, self.config.token_timeout_s):
                    for group in list(self._flights):  # a stage is down: those steps never land
                        self._fail_flight(group, PeerError("redeploying: a step of the old plan never came back"))
                old, self.deployment = self.deployment, None
                await old.aclose()
                self.deployment = await self._deploy(tuple(plan))
                for slot, session in self._sessions.items():
                    await self.deployment.open_slots([slot], session.sampling)
                    turn = self._turns.get(slot)
                    if turn is not None:
                        turn.pending = session.history + turn.pending
                    else:
                        session.unfed = session.history + session.unfed
                    session.history = []
            finally:
                self._paused = False
                self._launch()

    # ------------------------------------------------------------ sessions

    async def open_session(self, sampling: SamplingParams = GREEDY, one_shot: bool = False) -> Session:
        """A new sequence with its own KV slot; waits while every slot is taken."""
        async with self._slot_freed:
            while (slot := choose_slot(self.layout, self._free_slots(), self._sessions)) is None \
                    and self._stack is not None:
                await self._slot_freed.wait()  # woken by a freed slot, or by aclose()
            if self._stack is None:
                raise RuntimeError("pipeline closed")
            session = self._sessions[slot] = Session(self, slot, sampling, one_shot)
        try:
            async with self._control:
                await self.deployment.open_slots([slot], sampling)
        except BaseException:
            await self._free(slot)
            raise
        return session

    def _free_slots(self) -> list[int]:
        return [s for s in range(self.layout.slots) if s not in self._sessions]

    async def _release(self, session: Session) -> None:
        # The slot is reused only after every stage freed it, so a later OPEN never races the CLOSE.
        if session._released:
            return
        session._released = True
        try:
            turn = self._turns.get(session.slot)
            if turn is not None:  # a cancelled step still in flight: let it land first (or time out)
                if not await wait_event(turn.finished, self.config.token_timeout_s):
                    self._expire(turn)
            async with self._control:
                if self.deployment is not None:
                    await self.deployment.close_slots([session.slot])
        except Exception as exc:  # cleanup: a failure here must not cancel whoever owns the TaskGroup
            log.warning("closing slot %d: %s", session.slot, exc)
        finally:
            await self._free(session.slot)

    async def _free(self, slot: int) -> None:
        async with self._slot_freed:
            self._sessions.pop(slot, None)
            self._slot_freed.notify_all()

    async def generate(self, prompt: Sequence[int], max_new_tokens: int, sampling: SamplingParams = GREEDY,
                       stop_ids: Sequence[int] = ()) -> AsyncIterator[int]:
        """Stream one request's tokens; its slot is freed as soon as it finishes."""
        session = await self.open_session(sampling, one_shot=True)
        try:
            async for token in session.generate(prompt, max_new_tokens, stop_ids):
                yield token
        finally:
            if session._turn is None:  # the turn never started: nothing else will free the slot
                await session.aclose()

    async def generate_all(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                           sampling: SamplingParams = GREEDY, stop_ids: Sequence[int] = ()) -> list[list[int]]:
        """Generated tokens for every prompt, all admitted at once (they share the pipeline)."""
        async def one(prompt: Sequence[int]) -> list[int]:
            return [t async for t in self.generate(prompt, max_new_tokens, sampling, stop_ids)]

        return list(await asyncio.gather(*(one(p) for p in prompts)))

    # ------------------------------------------------------------ the step loop

    def _start_turn(self, turn: _Turn) -> None:
        self._turns[turn.session.slot] = turn
        self._launch()

    def _cancel_turn(self, turn: _Turn) -> None:
        turn.cancelled = True
        if not turn.in_flight and not turn.done:
            self._finish_turn(turn)

    def _finish_turn(self, turn: _Turn, error: Exception | None = None) -> None:
        turn.done = True
        turn.finished.set()
        self._turns.pop(turn.session.slot, None)
        turn.queue.put_nowait(_END if error is None else error)
        if turn.session._one_shot:
            turn.session._closed = True
            self._tg.create_task(self._release(turn.session))

    def _launch(self) -> None:
        """Start every micro-batch step the schedule allows now."""
        if self._paused or self.deployment is None:
            return
        ready = {self.layout.group_of(s) for s, t in self._turns.items() if t.pending and not t.in_flight}
        for group in groups_to_launch(self.mode, ready, self._flights.keys()):
            rows = {s: t.pending for s, t in self._turns.items()
                    if self.layout.group_of(s) == group and t.pending and not t.in_flight}
            step = build_step(rows)
            for slot in step.slots:
                turn = self._turns[slot]
                turn.session.history += turn.pending
                turn.session.prefilled_tokens += len(turn.pending)
                turn.pending, turn.in_flight = [], True
            self._flights[group] = _Flight(self._next_step, step.slots)
            self._drained.clear()
            lengths = None if step.uniform else list(step.lengths)
            tokens = torch.tensor(step.tokens)
            # Straight to the torch thread: the step starts while this loop goes on.
            done = self.deployment.submit_first_stage(group, self._next_step, list(step.slots), tokens, lengths)
            self._first_stage_queued += 1
            done.add_done_callback(functools.partial(self._first_stage_done, self.deployment, group, self._next_step,
                                                     sum(lengths) if lengths else tokens.numel()))
            self._next_step += 1

    def _first_stage_done(self, deployment: Deployment, group: int, step: int, tokens: int,
                          done: asyncio.Future) -> None:
        self._first_stage_queued -= 1
        if deployment is not self.deployment or done.cancelled():  # closed or replaced meanwhile
            return
        if done.exception() is not None:  # e.g. a peer socket gone; fail this micro-batch only
            self._fail_flight(group, done.exception(), step)
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
            self._fail_flight(message["mb"], PeerError(message["error"]), message["step"])

    def _on_tokens(self, group: int, step: int, tokens: torch.Tensor) -> None:
        flight = self._flights.get(group)
        if flight is None or flight.step != step or tokens.shape != (len(flight.slots),):
            log.warning("dropping tokens for micro-batch %d step %d: not in flight", group, step)
            return
        del self._flights[group]
        delivered, ended = [], []
        for slot, token in zip(flight.slots, tokens.tolist()):
            turn = self._turns[slot]
            turn.in_flight = False
            if turn.cancelled:
                ended.append(turn)
                continue
            turn.generated += 1
            self.tokens_generated += 1
            delivered.append((turn, token))
            if turn_finished(turn.generated, turn.max_new_tokens, token, turn.stop_ids):
                turn.session.unfed = [token]
                ended.append(turn)
            else:
                turn.pending = [token]
        # The next step first (No-Bubbles: it starts the moment its token is back), then the
        # bookkeeping and the consumers, which run while the step computes.
        for turn in ended:
            self._turns.pop(turn.session.slot, None)
        self._after_flight()
        for turn, token in delivered:
            turn.queue.put_nowait(token)
        for turn in ended:
            self._finish_turn(turn)

    def _expire(self, turn: _Turn) -> None:
        error = PeerError(f"no token within {self.config.token_timeout_s} s: a stage is down or stuck")
        group = self.layout.group_of(turn.session.slot)
        if turn.in_flight and group in self._flights:
            self._fail_flight(group, error)
        elif not turn.done:
            self._finish_turn(turn, error)

    def _fail_flight(self, group: int, error: Exception, step: int | None = None) -> None:
        flight = self._flights.get(group)
        if flight is None or (step is not None and flight.step != step):
            return
        del self._flights[group]
        for slot in flight.slots:
            if slot in self._turns:
                self._finish_turn(self._turns[slot], error)
        self._after_flight()

    def _after_flight(self) -> None:
        if not self._flights:
            self._drained.set()
        self._launch()

    # ------------------------------------------------------------ live view

    @property
    def micro_batches_in_flight(self) -> int:
        return len(self._flights)

    async def stage_stats(self) -> list[StageStats]:
        """Per-stage busy share, tokens/s and queue since the previous call (or deployment)."""
        now = time.perf_counter()
        statuses = [{**self._local, "queued": max(0, self._first_stage_queued - 1)}, *await self.deployment.peer_status()]
        prev_t, prev = self._last_stats or (now, [{"busy_s": 0.0, "steps": 0, "tokens": 0}] * len(statuses))
        self._last_stats = (now, statuses)
        span = max(now - prev_t, 1e-9)
        return [
            StageStats(stage.address, stage.start, stage.end, min(1.0, (cur["busy_s"] - old["busy_s"]) / span),
                       (cur["tokens"] - old["tokens"]) / span, (cur["steps"] - old["steps"]) / span, cur["queued"])
            for stage, cur, old in zip(self.deployment.plan, statuses, prev)
        ]
