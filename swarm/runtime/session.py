"""One sequence of a Pipeline and the handle its user holds: ``Session``.

A session owns its sequence: its tokens, how many of them the KV cache holds, its
slot and its turn. Every change of its turn's state goes through the table of
``swarm.runtime.turns``; ``apply`` carries out what the table says. The pipeline's
step loop (swarm.runtime.engine) launches the sequence's steps and applies the
events that come back (LAUNCH, TOKEN, FORGET, STEP_FAILED); the user's calls apply
START, END and CLOSE. All of it runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Collection, Sequence

from swarm.aio import wait_event
from swarm.model.sampling import SamplingParams
from swarm.model.stopping import turn_finished
from swarm.runtime.schedule import check_turn_fits, replay_skips
from swarm.runtime.speculate import Speculator
from swarm.runtime.turns import Action, TurnEvent, TurnState, transition

if TYPE_CHECKING:
    from swarm.runtime.engine import Pipeline

log = logging.getLogger(__name__)

_END = object()  # end of a turn's token stream


@dataclass(frozen=True)
class _Drafting:
    """Drafts a draft model computes on its thread for a sequence of ``tokens`` tokens."""

    tokens: int
    future: asyncio.Future  # of list[int]


@dataclass
class _Turn:
    max_new_tokens: int
    stop_ids: frozenset[int]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # tokens, then _END or an exception
    generated: int = 0


class Session:
    """A handle on one sequence of a Pipeline, holding one KV slot across turns until ``aclose()``.

    The token sampled last in a turn is fed at the start of the next one, so a new turn
    computes only its new tokens (and the one sampled last). Made by ``Pipeline.open_session``.

    For its user: ``generate``, ``cancel``, ``aclose``, ``history``, ``fed_tokens``. For the
    pipeline's step loop: ``tokens[cached:]`` and ``draft()`` (what the next step feeds),
    ``sent``, ``back``.

    With a ``speculator``, a step may also feed drafted tokens (``drafts``); they are never
    part of ``tokens``, which holds only what the verifier accepted (so a replay after a lost
    stage feeds the accepted history only).
    """

    def __init__(self, pipeline: Pipeline, slot: int, sampling: SamplingParams, one_shot: bool = False,
                 speculator: Speculator | None = None) -> None:
        self._pipeline = pipeline
        self.slot = slot
        self.sampling = sampling
        self.one_shot = one_shot  # closes itself when its one turn ends
        self.speculator = speculator
        self.tokens: list[int] = []  # everything fed or sampled (and accepted), in order
        # How many of ``tokens`` the KV cache of the current deployment holds; the stages may
        # hold more (a rejected draft's positions): each step tells them to keep this many.
        self.cached = 0
        # Positions of ``tokens`` that every stage of the current deployment holds for sure (a
        # step out may or may not have reached a stage; a step whose token came back did).
        self.confirmed = 0
        # After a re-deployment, until the next step: per stage, the positions it holds (0 where
        # freshly loaded); that step replays on each stage only the rest (schedule.replay_skips).
        self.holds: tuple[int, ...] | None = None
        self.drafts: tuple[int, ...] = ()  # the drafts of the step out (the verifier draws after each)
        self.fed = 0  # tokens run through the model for this sequence (replays included)
        self.state = TurnState.IDLE
        self.idle = asyncio.Event()  # no step of this sequence out
        self._drafting: _Drafting | None = None  # drafts being computed off the loop (a draft model)
        self.idle.set()
        self._turn: _Turn | None = None

    @property
    def history(self) -> tuple[int, ...]:
        """Every token of the sequence: prompts, turns and sampled tokens, in order."""
        return tuple(self.tokens)

    @property
    def fed_tokens(self) -> int:
        """Tokens this sequence has run through the model (a replay after a lost stage counts)."""
        return self.fed

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def draft(self) -> tuple[int, ...] | None:
        """Drafts for the next step to verify (none without a speculator, or when the turn has
        room for one token only): the step of a turn can never yield more than the turn takes,
        nor reach past the slot (``check_turn_fits`` counted the turn's tokens).

        None while a draft model computes them on its own thread (``Speculator.off_loop``): the
        step loop launches this sequence's micro-batch again when they are ready, and the event
        loop answers everything else meanwhile."""
        if self.speculator is None or self._turn is None:
            return ()
        room = self._turn.max_new_tokens - self._turn.generated - 1
        if not self.speculator.off_loop:
            return tuple(self.speculator.propose(self.tokens, room)) if room > 0 else ()
        job = self._drafting
        if job is not None:  # kept until the step goes out (``sent``): a launch may skip the group
            if not job.future.done():
                return None
            error = "cancelled" if job.future.cancelled() else job.future.exception()
            if error is not None:
                log.warning("the draft model failed: %r; a step without drafts", error)
                self._drafting = None
                return ()
            if job.tokens == len(self.tokens):  # proposed for this very history
                return tuple(job.future.result()[:room])
            self._drafting = None  # the history moved on since (a turn ended, say): ask again
        k = self.speculator.draft_length(room) if room > 0 else 0
        if k <= 0:
            return ()
        future = asyncio.wrap_future(self.speculator.drafter.submit(list(self.tokens), k))
        future.add_done_callback(lambda _: self._pipeline.steps.launch())
        self._drafting = _Drafting(len(self.tokens), future)
        return None

    def reheld(self, kv_kept: Sequence[bool]) -> None:
        """A new deployment replaced the old one: the stages marked in ``kv_kept`` (kept in place)
        still hold what every old stage held for sure, the others nothing."""
        held = min(self.holds) if self.holds else self.confirmed
        self.holds = tuple(held if kept else 0 for kept in kv_kept)
        self.cached = self.confirmed = 0

    def replay_from(self) -> tuple[int, ...] | None:
        """Per stage, where the next step starts computing (None: at ``cached`` on every stage).
        After a re-deployment it sets ``cached`` to where the first stage starts."""
        if self.holds is None or not self.tokens:
            return None
        skips, self.holds = replay_skips(self.holds, len(self.tokens)), None
        self.cached = skips[0]
        return skips

    def sent(self, drafts: tuple[int, ...] = ()) -> None:
        """Its micro-batch step went out with every token the cache did not hold, and ``drafts``."""
        self.confirmed = self.cached  # every stage is set back to this many, then computes the rest
        self.fed += len(self.tokens) - self.cached + len(drafts)
        self.cached = len(self.tokens)
        self.drafts = drafts
        self._drafting = None
        self.apply(TurnEvent.LAUNCH)
        self.idle.clear()

    def back(self, event: TurnEvent, tokens: Sequence[int] = (), error: BaseException | None = None) -> None:
        """Its step is over (TOKEN, STEP_FAILED or FORGET): nothing of it is out any more.
        With TOKEN, ``tokens`` are the step's accepted tokens (one, or more after a verify step)."""
        self.idle.set()
        self.drafts = ()
        before = len(self.tokens)
        self.apply(event, tokens, error)
        delivered = len(self.tokens) - before
        # The cache holds the accepted drafts delivered, not the last token (fed next, as after
        # a plain step); anything beyond is dropped by the next step's ``keep``.
        self.cached += max(0, delivered - 1)
        if event is TurnEvent.TOKEN:  # every stage computed the step
            self.confirmed = self.cached

    def apply(self, event: TurnEvent, tokens: Sequence[int] = (),
              error: BaseException | None = None) -> tuple[Action, ...]:
        """Move the turn by ``event`` and deliver or end its stream as the table says; returns
        the actions. A TOKEN delivers its tokens in order until one finishes the turn (its max
        or a stop token), which also ENDs it; the tokens after that one are dropped."""
        step = transition(self.state, event)
        self.state = step.state
        for action in step.actions:
            if action is Action.DELIVER:
                for token in tokens:
                    self.tokens.append(token)
                    self._turn.generated += 1
                    self._turn.queue.put_nowait(token)
                    if turn_finished(self._turn.generated, self._turn.max_new_tokens, token, self._turn.stop_ids):
                        self.apply(TurnEvent.END)
                        break
            elif action is Action.END_STREAM:
                turn, self._turn = self._turn, None
                turn.queue.put_nowait(_END if error is None else error)
        return step.actions

    async def generate(self, new_tokens: Sequence[int], max_new_tokens: int,
                       stop_ids: Collection[int] = ()) -> AsyncIterator[int]:
        """Feed ``new_tokens`` and stream up to ``max_new_tokens`` sampled tokens; the stop
        token, if hit, is the last one yielded. Raises ContextFull before computing when the
        turn cannot fit the slot. Leaving the iteration early cancels the turn."""
        pipeline = self._pipeline
        if self.state is TurnState.CANCELLING:  # the last turn's cancelled step has not landed yet
            await wait_event(self.idle, pipeline.config.step_timeout_s)
        transition(self.state, TurnEvent.START)  # refuses a closed or busy session before anything else
        pipeline.check_usable()
        new_tokens = list(new_tokens)
        if max_new_tokens < 1 or not (new_tokens or len(self.tokens) > self.cached):
            raise ValueError("a turn needs at least one token to feed and max_new_tokens >= 1")
        check_turn_fits(len(self.tokens) + len(new_tokens), max_new_tokens, pipeline.config.max_len)
        self.tokens += new_tokens
        turn = self._turn = _Turn(max_new_tokens, frozenset(stop_ids))
        self.apply(TurnEvent.START)
        pipeline.steps.launch()
        try:
            while (item := await turn.queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if self._turn is turn:  # the consumer left early: nothing more is computed for it
                self.apply(TurnEvent.END)
            if self.one_shot:
                await self.aclose()

    def cancel(self) -> None:
        """End the running turn now; a token still in flight is dropped when it lands."""
        self.apply(TurnEvent.END)

    async def aclose(self) -> None:
        """Free the slot on every stage; safe to call twice."""
        actions = self.apply(TurnEvent.CLOSE)
        if Action.RELEASE_SLOT not in actions:
            return  # closed already
        try:
            if Action.AWAIT_STEP in actions:  # let the step land (or be forgotten) before the slot is freed
                await wait_event(self.idle, self._pipeline.config.step_timeout_s)
            await self._pipeline.close_slot(self.slot)
        except Exception as exc:  # cleanup: a failure here must not cancel whoever owns the TaskGroup
            log.warning("closing slot %d: %s", self.slot, exc)
        finally:
            await self._pipeline.release(self)
