"""Speculative decoding's decisions, as pure functions: what to draft, what to accept, how far.

A sequence that speculates sends its last token and k drafted ones as one step of
width k + 1; the last stage draws at every one of those positions with the sequence's
own sampler, each draw seeded by (seed, position) as plain decoding seeds it. A draft
equal to the draw at its position is exactly the token plain decoding would have
produced there, so the answer is token for token the plain run's, greedy or sampled:

    drafts = lookup_draft(history, k)          # prompt lookup: what followed the last n-gram before
    got = accept(drafts, draws)                # the drafts that match, plus the next draw
    length.verified(len(drafts), len(got) - 1) # adaptive k for this sequence

No torch, no sockets: the session and the step loop (swarm.runtime.session, .steps)
carry these out; a draft model (swarm.model.draft) proposes through the same ``Drafter``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol, Sequence

MAX_DRAFT = 8  # drafts per step at most: a wider step costs more than its likely gain
START_DRAFT = 2  # the first step's drafts, before any acceptance is known (k doubles from here)
MAX_NGRAM = 3  # the longest suffix looked up in the history
MIN_NGRAM = 2  # a single token (" the", a comma) recurs everywhere and predicts little of what follows
REST_STEPS = 4  # after a step with nothing accepted at k = 1: steps without drafts before trying again
MAX_REST_STEPS = 64  # the rest doubles on every fruitless try, up to this
DEFAULT_SPECULATION = "ngram"  # --speculate's default: prompt lookup (docs/speculative.md says why)


class Speculation(str, enum.Enum):
    """``--speculate``: where drafts come from."""

    OFF = "off"
    NGRAM = "ngram"  # prompt lookup in the sequence's own history
    MODEL = "model"  # a small draft model (``--speculate-model``)


class Drafter(Protocol):
    """Proposes up to ``k`` tokens to follow ``tokens`` (fewer, or none, when it has no guess).

    A drafter that computes (a draft model) may also have ``submit(tokens, k)``, returning a
    ``concurrent.futures.Future`` of the same list: the step loop then asks for drafts off the
    event loop, on the thread that owns the draft model (swarm.model.draft), and launches the
    sequence's step when they are ready."""

    def propose(self, tokens: Sequence[int], k: int) -> list[int]: ...


def lookup_draft(tokens: Sequence[int], k: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> list[int]:
    """Prompt lookup: the longest suffix of ``tokens`` (``max_ngram`` down to ``min_ngram``
    tokens) that occurred earlier proposes the up to ``k`` tokens that followed its first
    occurrence. [] when no such n-gram occurred or ``k`` is 0."""
    if k <= 0:
        return []
    size = len(tokens)
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        suffix = list(tokens[size - n:])
        first = suffix[0]
        # First occurrence first: an answer copies from the text it was given (the prompt),
        # where a later occurrence is often the answer's own variant of it. Replayed on the
        # plain answers of benchmarks/bench_speculate.py, passes per token went 0.398 -> 0.320
        # (code), 0.648 -> 0.602 (summarize), 0.445 -> 0.430 (edit), 0.969 -> 0.938 (free).
        for start in range(size - n):
            if tokens[start] == first and list(tokens[start:start + n]) == suffix:
                return list(tokens[start + n:start + n + k])
    return []


class LookupDrafter:
    """``Drafter`` by prompt lookup (``lookup_draft``): no model, no state."""

    def __init__(self, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> None:
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        return lookup_draft(tokens, k, self.max_ngram, self.min_ngram)


def accept(drafts: Sequence[int], draws: Sequence[int]) -> list[int]:
    """The tokens a verify step yields: the longest prefix of ``drafts`` equal to the verifier's
    ``draws`` at the same positions, plus the draw that follows it (``draws`` has one more
    entry than ``drafts``: the draw after the last token, after each draft)."""
    if len(draws) != len(drafts) + 1:
        raise ValueError(f"{len(drafts)} drafts need {len(drafts) + 1} draws, got {len(draws)}")
    n = 0
    while n < len(drafts) and drafts[n] == draws[n]:
        n += 1
    return list(draws[:n + 1])


def expected_tokens(rate: float, k: int) -> float:
    """Tokens a verify step of ``k`` drafts yields when each draft is accepted with probability
    ``rate`` (given the ones before it): 1 + rate + ... + rate^k."""
    return sum(rate ** i for i in range(k + 1))


def best_draft(rate: float, costs: Sequence[float], max_k: int) -> int:
    """The number of drafts that gives the most tokens per second: ``costs[k]`` is what a step
    of width k + 1 costs (the plan's figure, ``discovery.problem.predicted_step_s``: on a
    CPU a wider step costs far less than k + 1 steps; over hops, less still)."""
    top = min(max_k, len(costs) - 1)
    return max(range(top + 1), key=lambda k: (expected_tokens(rate, k) / costs[k], -k))


RATE_WEIGHT = 0.3  # of the last verify step in a sequence's acceptance estimate
START_RATE = 0.6  # a new sequence's acceptance estimate


@dataclass
class DraftLength:
    """Adaptive k for one sequence, from its recent acceptance.

    Everything accepted: k doubles (up to ``max_k``); some: k becomes what was accepted plus
    one; none: k halves, and at k = 1 the sequence drafts nothing for ``rest`` steps, a rest
    that doubles with every fruitless try. So a text with nothing to look up soon runs plain
    steps only, and still gets a rare probe in case it starts repeating itself. With
    ``costs`` (a step's cost by width), k is also capped where a wider step would cost more
    than the tokens the sequence's acceptance rate promises (``best_draft``)."""

    max_k: int = MAX_DRAFT
    k: int = START_DRAFT
    costs: tuple[float, ...] | None = None
    rate: float = START_RATE  # drafts accepted per draft sent, recently
    rest: int = 0  # steps left without drafts
    next_rest: int = REST_STEPS

    def __post_init__(self) -> None:
        self.k = min(self.k, self.max_k)

    def next(self) -> int:
        """Drafts for the next step (0 while resting); call once per step."""
        if self.max_k <= 0:
            return 0
        if self.rest > 0:
            self.rest -= 1
            return 0
        if self.costs:
            return min(self.k, max(1, best_draft(self.rate, self.costs, self.max_k)))
        return self.k

    def verified(self, drafted: int, accepted: int) -> None:
        """A verify step of ``drafted`` drafts came back with ``accepted`` of them accepted."""
        if drafted <= 0:
            return
        self.rate += RATE_WEIGHT * (accepted / drafted - self.rate)
        if accepted > 0:
            self.next_rest = REST_STEPS
        if accepted >= drafted:
            self.k = min(self.max_k, max(self.k, drafted * 2))  # fewer drafts than k: the drafter ran out
        elif accepted > 0:
            self.k = accepted + 1
        elif drafted > 1:
            self.k = max(1, drafted // 2)
        else:
            self.k = 1
            self.rest, self.next_rest = self.next_rest, min(MAX_REST_STEPS, self.next_rest * 2)


def fit_drafts(rows: Sequence[tuple[int, int, Sequence[int]]], max_len: int) -> list[list[int]]:
    """Each row's drafts, cut so that the step fits every row's slot. ``rows``: (positions the
    slot holds, tokens the row feeds, its drafts). Rows are right-padded to the widest, and a
    padded row's cache writes reach as far as the width: so the width may not pass what the
    fullest slot has left (``max_len`` positions a slot)."""
    widest = min(max_len - cached for cached, _, _ in rows)
    return [list(drafts[:max(0, widest - fed)]) for _, fed, drafts in rows]


@dataclass
class SpeculationStats:
    """Drafts sent and accepted, over every verify step (the acceptance rate's parts)."""

    verify_steps: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class Speculator:
    """One sequence's drafting: its drafter, its adaptive k and its own drafts counted (what
    ``serve`` reports for one request)."""

    drafter: Drafter
    length: DraftLength = field(default_factory=DraftLength)
    stats: SpeculationStats = field(default_factory=SpeculationStats)

    def propose(self, tokens: Sequence[int], limit: int) -> list[int]:
        """Drafts to follow ``tokens``, at most ``limit`` (what the turn and the slot still allow)."""
        k = self.draft_length(limit)
        return self.drafter.propose(tokens, k)[:k] if k > 0 else []

    def draft_length(self, limit: int) -> int:
        """How many drafts the next step asks for (adaptive k, at most ``limit``); once per step."""
        return min(self.length.next(), limit)

    @property
    def off_loop(self) -> bool:
        """The drafter computes on a thread of its own (``submit``): ask it ahead, not in a launch."""
        return callable(getattr(self.drafter, "submit", None))

    def verified(self, drafted: int, accepted: int) -> None:
        """A verify step of ``drafted`` drafts came back with ``accepted`` of them accepted."""
        self.length.verified(drafted, accepted)
        self.stats.verify_steps += 1
        self.stats.drafted += drafted
        self.stats.accepted += accepted
