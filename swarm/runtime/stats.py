"""Per-stage statistics of a pipeline: busy share, tokens/s and queue, between two reads.

Every stage counts its own work (busy seconds, steps, tokens) from the start of its
deployment; a reading is the difference between two counts over the time between them.
The peers report theirs in their STATUS reply; the source's own stage is counted here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Sequence

from swarm.runtime.deploy import StagePlacement


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


_ZERO = {"busy_s": 0.0, "steps": 0, "tokens": 0}


def rates(plan: Sequence[StagePlacement], now: Sequence[Mapping], before: Sequence[Mapping],
          span_s: float) -> list[StageStats]:
    """Each stage's statistics from its counters ``now`` and ``before``, ``span_s`` apart."""
    span_s = max(span_s, 1e-9)
    return [
        StageStats(stage.address, stage.start, stage.end, min(1.0, (cur["busy_s"] - old["busy_s"]) / span_s),
                   (cur["tokens"] - old["tokens"]) / span_s, (cur["steps"] - old["steps"]) / span_s, cur["queued"])
        for stage, cur, old in zip(plan, now, before)
    ]


class StageCounters:
    """The source stage's counters, and the last reading of every stage's (for the next difference)."""

    def __init__(self) -> None:
        self._local = dict(_ZERO)
        self.queued = 0  # steps submitted to this process's torch thread, not yet done
        self._last: tuple[float, list[Mapping]] | None = None

    def step_done(self, compute_s: float, tokens: int) -> None:
        self._local["busy_s"] += compute_s
        self._local["steps"] += 1
        self._local["tokens"] += tokens

    def restart(self, peer_statuses: Sequence[Mapping]) -> None:
        """A new deployment: the next reading is over the time from now."""
        self._last = (time.perf_counter(), [{**self._local, "queued": 0}, *peer_statuses])

    def read(self, plan: Sequence[StagePlacement], peer_statuses: Sequence[Mapping]) -> list[StageStats]:
        """Every stage of ``plan`` since the previous reading (or the deployment)."""
        now = time.perf_counter()
        # The step computing now is not waiting: only those behind it are queued.
        statuses = [{**self._local, "queued": max(0, self.queued - 1)}, *peer_statuses]
        then, before = self._last or (now, [_ZERO] * len(statuses))
        self._last = (now, statuses)
        return rates(plan, statuses, before, now - then)
