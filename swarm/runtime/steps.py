"""The step loop: micro-batch steps out to the first stage, tokens back to their sessions.

Each launch sends every micro-batch the schedule (swarm.runtime.schedule) allows,
with the rows of its WAITING sessions, each row its tokens to feed and its drafts to
verify (speculative decoding: swarm.runtime.speculate); a step's end (its tokens, its error, or a
recovery forgetting it) goes back to those sessions as one turn event each
(swarm.runtime.turns), and the next steps launch at once. A step that will not come
back (overdue, unsendable, failed on a peer) is a lost stage: the pipeline recovers.
Runs on the event loop; the first stage computes on the deployment's torch thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import zmq

from swarm.runtime.deploy import Deployment
from swarm.runtime.schedule import build_step, groups_to_launch, rows_that_fit
from swarm.runtime.session import Session
from swarm.runtime.speculate import SpeculationStats, accept, fit_drafts
from swarm.runtime.stats import StageCounters
from swarm.runtime.turns import TurnEvent, TurnState
from swarm.runtime.wire import Kind, Message

if TYPE_CHECKING:
    from swarm.runtime.engine import Pipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Flight:
    step: int
    sessions: tuple[Session, ...]  # one per row, in the step's order
    launched: float  # time.monotonic()
    overdue: asyncio.TimerHandle


class StepLoop:
    """The steps in flight of one pipeline (one per micro-batch at most).

    ``lost``: told why when a step will never come back; ``landed``: told when a step's
    tokens came back (the recovery before it, if any, worked).
    """

    def __init__(self, pipeline: Pipeline, stats: StageCounters, lost: Callable[[str], None],
                 landed: Callable[[], None]) -> None:
        self._pipeline = pipeline
        self._stats = stats
        self._lost = lost
        self._landed = landed
        self._flights: dict[int, _Flight] = {}  # micro-batch -> step in flight
        self._next_step = 1
        self.paused = False  # a deployment is being replaced: nothing launches
        self.speculation = SpeculationStats()

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    def launch(self) -> None:
        """Start every micro-batch step the schedule allows now."""
        pipeline = self._pipeline
        deployment, layout = pipeline.deployment, pipeline.layout
        if self.paused or deployment is None or pipeline.closed:
            return
        waiting = [s for s in pipeline.sessions if s.state is TurnState.WAITING]
        ready = {layout.group_of(s.slot) for s in waiting}
        loop = asyncio.get_running_loop()
        stages = len(deployment.plan)
        for group in groups_to_launch(pipeline.mode, ready, self._flights.keys()):
            rows = {s.slot: s for s in waiting if layout.group_of(s.slot) == group}
            # A replay after a re-deployment starts each stage where its KV cache ends. (A row
            # left for a later step then replays from ``cached`` on every stage: more, still exact.)
            starts = {slot: s.replay_from() for slot, s in rows.items()}
            fits = rows_that_fit({slot: (s.cached, len(s.tokens) - s.cached) for slot, s in rows.items()},
                                 pipeline.config.max_len)
            rows = {slot: rows[slot] for slot in fits}
            proposed = {slot: s.draft() for slot, s in rows.items()}
            if any(d is None for d in proposed.values()):
                continue  # a draft model is still computing a row's drafts: launched when they land
            feeds = {slot: s.tokens[s.cached:] for slot, s in rows.items()}
            fitted = fit_drafts([(s.cached, len(feeds[slot]), proposed[slot]) for slot, s in rows.items()],
                                pipeline.config.max_len)
            drafts = {slot: tuple(d) for slot, d in zip(rows, fitted)}
            step = build_step({slot: feeds[slot] + list(drafts[slot]) for slot in rows})
            sessions = tuple(rows[slot] for slot in step.slots)
            # Every stage sets each slot back to what its session holds (a rejected draft's
            # positions dropped), and draws after each draft where a row verifies some.
            keep = [s.cached for s in sessions]
            skips = None
            if any(starts[s.slot] is not None for s in sessions) and stages > 1:  # per peer stage, per row
                skips = [[(starts[s.slot] or (s.cached,) * stages)[i] for s in sessions] for i in range(1, stages)]
            draws = [len(drafts[s.slot]) + 1 for s in sessions] if any(drafts.values()) else None
            for session in sessions:
                session.sent(drafts[session.slot])
            number = self._next_step
            self._next_step += 1
            timeout = pipeline.config.step_timeout_s
            overdue = loop.call_later(timeout, self._step_lost, group, number,
                                      f"step {number} not back within {timeout} s")
            self._flights[group] = _Flight(number, sessions, time.monotonic(), overdue)
            lengths = None if step.uniform else list(step.lengths)
            tokens = torch.tensor(step.tokens)
            # Straight to the torch thread: the step starts while this loop goes on.
            done = deployment.submit_first_stage(group, number, list(step.slots), tokens, lengths, keep, draws, skips)
            self._stats.queued += 1
            done.add_done_callback(functools.partial(self._first_stage_done, deployment, group, number,
                                                     sum(lengths) if lengths else tokens.numel()))

    def _first_stage_done(self, deployment: Deployment, group: int, step: int, tokens: int,
                          done: asyncio.Future) -> None:
        self._stats.queued -= 1
        if deployment is not self._pipeline.deployment or done.cancelled():  # closed or replaced meanwhile
            return
        error = done.exception()
        if isinstance(error, (zmq.ZMQError, OSError)):  # the next stage's socket gone: a lost stage
            self._step_lost(group, step, f"sending a step failed: {error}")
        elif error is not None:  # the shard refused the step: its turns fail, the others go on
            self._land(group, step, TurnEvent.STEP_FAILED, error=error)
        else:
            out, compute_s = done.result()
            self._stats.step_done(compute_s, tokens)
            if out is not None:  # the source holds the whole model
                self._on_tokens(group, step, out)

    def on_peer_message(self, message: Message) -> None:
        """A stage's TOKENS or ERROR (the client's read loop calls this)."""
        dep = self._pipeline.deployment
        if dep is None or message.get("dep") != dep.dep_id:
            log.debug("dropping %s from another deployment", message.kind.value)
        elif message.kind is Kind.TOKENS:
            self._on_tokens(message["mb"], message["step"], message.tensors[0])
        elif message.kind is Kind.ERROR:
            self._step_lost(message["mb"], message["step"], f"a stage failed a step: {message['error']}")

    def _on_tokens(self, group: int, step: int, tokens: torch.Tensor) -> None:
        """A step's draws: int64 [B] (one per row), or [B, D] when some row verified drafts."""
        flight = self._flights.get(group)
        if flight is not None:
            widest = 1 + max(len(s.drafts) for s in flight.sessions)
            expected = (len(flight.sessions),) if widest == 1 else (len(flight.sessions), widest)
        if flight is None or flight.step != step or tuple(tokens.shape) != expected:
            log.warning("dropping tokens for micro-batch %d step %d: not in flight", group, step)
            return
        draws = tokens.tolist() if tokens.dim() == 2 else [[t] for t in tokens.tolist()]
        accepted = []
        for session, row in zip(flight.sessions, draws):
            got = accept(session.drafts, row[:len(session.drafts) + 1])
            if session.drafts:
                session.speculator.verified(len(session.drafts), len(got) - 1)
                self.speculation.verify_steps += 1
                self.speculation.drafted += len(session.drafts)
                self.speculation.accepted += len(got) - 1
            accepted.append(got)
        self._land(group, step, TurnEvent.TOKEN, accepted)
        self._landed()

    def _land(self, group: int, step: int, event: TurnEvent, tokens: Sequence[Sequence[int]] | None = None,
              error: BaseException | None = None) -> None:
        """Step ``step`` of micro-batch ``group`` is over: each of its sessions takes ``event``
        (with its accepted tokens, or the error), then the next steps launch (No-Bubbles: the
        moment the tokens are back; the consumers, woken here, run while that step computes)."""
        flight = self._flights.get(group)
        if flight is None or flight.step != step:
            return
        del self._flights[group]
        flight.overdue.cancel()
        for i, session in enumerate(flight.sessions):
            session.back(event, () if tokens is None else tokens[i], error)
        self.launch()

    def _step_lost(self, group: int, step: int, reason: str) -> None:
        """A step that will never come back (overdue, unsendable, failed on a peer): a lost stage."""
        flight = self._flights.get(group)
        if flight is not None and flight.step == step:
            self._lost(reason)

    def forget(self) -> float:
        """Drop every step in flight (its tokens will never count; each session is WAITING again,
        or IDLE if its turn ended); returns when the oldest was launched."""
        oldest = min((f.launched for f in self._flights.values()), default=time.monotonic())
        flights, self._flights = list(self._flights.values()), {}
        for flight in flights:
            flight.overdue.cancel()
            for session in flight.sessions:
                session.back(TurnEvent.FORGET)
        return oldest

    def stop(self) -> None:
        """The pipeline is closing: no timer fires any more, no step counts."""
        for flight in self._flights.values():
            flight.overdue.cancel()
        self._flights.clear()
