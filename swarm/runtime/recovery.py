"""Losing a stage, and going on: the pipeline's recovery.

A stage lost mid-answer (its peer reported gone by the owner, a step overdue, a
step's error) is the normal path, not a failure: the pipeline stops launching,
forgets the steps in flight, asks its owner for a new plan over the peers still
alive, deploys it, and replays every live sequence's tokens as one prefill per
sequence (batched per micro-batch). Sampling is seeded per (sequence, position),
so the streams go on with the tokens an undisturbed run gives, none lost or repeated.

``Recovery`` keeps what the pipeline knows of its losses (the suspected addresses,
the recovery running, whether it is broken) and runs one recovery at a time; the
pipeline (swarm.runtime.engine) does the moving: pausing, forgetting steps,
switching deployments, launching the replay.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable

from swarm.model.shard import Shard
from swarm.runtime.client import PeerError, PeerRefused
from swarm.runtime.deploy import Deployment, StagePlacement

if TYPE_CHECKING:
    from swarm.runtime.engine import Pipeline

log = logging.getLogger(__name__)


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
    # Per stage of the new plan, the positions the replay computes (a stage kept in place with
    # its KV cache computes only what it lacks; a freshly loaded one every position).
    replayed: tuple[int, ...] = ()
    number: int = 0  # its place among its owner's recoveries (1: the first), stamped by the owner

    def describe(self) -> str:
        who = ", ".join(self.lost) or "a stage"
        if self.error is not None:
            return f"peer {who} lost; recovery failed: {self.error}"
        replayed = f", replaying {'/'.join(map(str, self.replayed))} positions per stage" if self.replayed else ""
        return f"peer {who} lost; re-planned over {self.peers} peer{'s' if self.peers != 1 else ''} in " \
               f"{self.redeploy_s + self.replay_s:.1f} s{replayed}"


_DEPLOY_ERRORS = (PeerError, TimeoutError, OSError)  # a peer lost (or silent) while a deployment loads


class Recovery:
    """The losses of one pipeline and the recovery from them, one at a time.

    ``replan``: called with the suspected stage addresses; returns the plan to recover
    on (None: a loss fails the running turns with StageLost). ``report``: told of every
    recovery, successful or not. ``attempts``: re-plan + deploy tries before giving up.
    """

    def __init__(self, pipeline: Pipeline, replan: Replan | None, report: Callable[[RecoveryEvent], None],
                 attempts: int) -> None:
        self._pipeline = pipeline
        self.replan = replan
        self._report = report
        self._attempts = attempts
        self.suspects: set[str] = set()  # stage addresses reported lost, not yet replaced
        self.broken: StageLost | None = None  # a recovery failed: nothing runs any more
        self.starting = False  # the first deployment is loading (it re-plans on a loss itself)
        self._task: asyncio.Task | None = None
        self._fruitless = 0  # recoveries since the last token: a step that fails every time ends it
        self._replaying: tuple[float, RecoveryEvent] | None = None  # waiting for the first token after one
        self._lost: tuple[str, ...] = ()  # the peers the running recovery gave up
        self._replayed: tuple[int, ...] = ()  # per stage, the positions the running recovery replays

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def wait(self) -> None:
        """Until the recovery running (if any) is over; leaving this wait does not cancel it."""
        if self._task is not None:
            await asyncio.wait({self._task})

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def start(self, tasks: asyncio.TaskGroup, reason: str) -> None:
        """Recover in the background, unless a recovery runs (it sees the new suspects) or the
        first deployment is loading (it re-plans on its own)."""
        if self.starting or self.running:
            return
        log.info("stage lost (%s): recovering", reason)  # the normal path: the owner shows the event
        self._task = tasks.create_task(self._recover(reason, time.monotonic()))

    def token_landed(self) -> None:
        """A step's token came back: the recovery before it (if any) worked."""
        self._fruitless = 0
        if self._replaying is not None:
            self._recovered()

    async def first_deployment(self, plan: tuple[StagePlacement, ...], shard: Shard | None = None) -> Deployment:
        """``plan``, loaded (its source stage ``shard`` where the caller loaded it). A peer lost
        while it loads (or that never answers) is a loss like any other: re-plan over the
        peers still alive and load again."""
        self.starting = True
        try:
            for attempt in range(1, self._attempts + 1):
                try:
                    fits = shard is not None and (shard.start, shard.end) == (plan[0].start, plan[0].end)
                    return await self._pipeline.deploy(plan, shard if fits else None)
                except PeerRefused:
                    raise  # a live peer said no (other weights, a bad request): another plan would not help
                except _DEPLOY_ERRORS as exc:
                    if self.replan is None or attempt == self._attempts:
                        raise
                    detected = time.monotonic()
                    log.warning("deploying failed (%s): re-planning", exc)
                    replanned = await self.replan(frozenset(self.suspects))
                    self.suspects.clear()
                    plan = replanned.stages
                    self._report(RecoveryEvent(replanned.lost, len(plan) - 1, 0.0, time.monotonic() - detected,
                                               0.0, 0, detected_at=detected))
            raise AssertionError("unreachable")
        finally:
            self.starting = False

    async def _recover(self, reason: str, detected: float) -> None:
        pipeline = self._pipeline
        async with pipeline.paused():
            oldest = pipeline.steps.forget()
            self._fruitless += 1
            self._lost, self._replayed = (), ()
            try:
                await self._redeploy(reason)
            except Exception as exc:
                self.broken = exc if isinstance(exc, StageLost) else StageLost(f"{reason}: {exc}")
                pipeline.fail_all(self.broken)
                self._report(RecoveryEvent(self._lost, 0, detected - oldest,
                                           time.monotonic() - detected, 0.0, len(pipeline.sessions),
                                           error=str(self.broken), detected_at=detected))
                return
        deployed = time.monotonic()
        self._replaying = (deployed, RecoveryEvent(
            self._lost, len(pipeline.deployment.plan) - 1, max(0.0, detected - oldest), deployed - detected, 0.0,
            sum(1 for s in pipeline.sessions if s.tokens), detected_at=detected, replayed=self._replayed))
        pipeline.steps.launch()
        if not pipeline.micro_batches_in_flight:  # nothing to replay now: the sequences replay on their next turn
            self._recovered()

    async def _redeploy(self, reason: str) -> None:
        """Re-plan and switch until a deployment holds (StageLost if none does)."""
        if self._fruitless > self._attempts:
            raise StageLost(f"{reason}; {self._attempts} recoveries in a row gave no token")
        if self.replan is None:
            raise StageLost(f"{reason}; this pipeline has no one to re-plan it")
        for attempt in range(1, self._attempts + 1):
            suspects = frozenset(self.suspects)
            asked = time.perf_counter()
            replanned = await self.replan(suspects)
            log.info("re-planned in %.2f s", time.perf_counter() - asked)
            # Every peer given up over the attempts: a second plan that gives up another (a
            # peer lost while the first loaded) does not hide the first loss from the report.
            self._lost = tuple(dict.fromkeys((*self._lost, *replanned.lost))) or tuple(sorted(suspects))
            try:
                self._replayed = await self._pipeline.switch(replanned.stages, suspects)
            except _DEPLOY_ERRORS as exc:
                log.warning("recovery attempt %d failed: %s", attempt, exc)
                continue
            # The new plan is over the peers live when it was made; one of them reported
            # lost since means another round.
            late = (self.suspects - suspects) & {s.address for s in replanned.stages}
            self.suspects = set(late)
            if not late:
                return
        raise StageLost(f"{reason}; no deployment held after {self._attempts} tries")

    def _recovered(self) -> None:
        deployed, event = self._replaying
        self._replaying = None
        event = dataclasses.replace(event, replay_s=time.monotonic() - deployed if event.sequences else 0.0)
        log.info("%s (detected in %.2f s, redeployed in %.2f s, replayed in %.2f s)", event.describe(),
                 event.detection_s, event.redeploy_s, event.replay_s)
        self._report(event)
