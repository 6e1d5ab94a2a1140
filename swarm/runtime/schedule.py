"""Scheduling decisions as pure functions: what the source launches next, and with what.

The KV slots are split into m micro-batches of b slots each (slot s belongs to
micro-batch s // b). A micro-batch step carries every sequence of that micro-batch
that has tokens to feed: a whole new prompt (or a new chat turn) for a sequence
that just joined, its last sampled token for one that is decoding. Sequences join
and leave between steps (iteration-level scheduling).

No-Bubbles (the paper's EdgeShard-No-Bubbles): a micro-batch starts its next step
the moment its tokens return. Bubbles: a per-token barrier, every micro-batch waits
until all of them have returned (GPipe-style; kept only for comparison).
Sequential inference is one micro-batch of one sequence.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Collection, Iterable, Mapping, Sequence


class Mode(str, enum.Enum):
    NO_BUBBLES = "no-bubbles"
    BUBBLES = "bubbles"


@dataclass(frozen=True)
class Layout:
    """m micro-batches of b slots: m * b KV slots in all."""

    micro_batches: int = 1
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.micro_batches < 1 or self.batch_size < 1:
            raise ValueError("micro_batches and batch_size must be at least 1")

    @property
    def slots(self) -> int:
        return self.micro_batches * self.batch_size

    def group_of(self, slot: int) -> int:
        return slot // self.batch_size


@dataclass(frozen=True)
class StepRows:
    """One micro-batch step: which slots, each row's tokens right-padded to one width."""

    slots: tuple[int, ...]
    tokens: tuple[tuple[int, ...], ...]  # padded with 0 to the widest row
    lengths: tuple[int, ...]  # real tokens per row

    @property
    def width(self) -> int:
        return len(self.tokens[0])

    @property
    def uniform(self) -> bool:
        return all(n == self.width for n in self.lengths)


def groups_to_launch(mode: Mode, ready: Collection[int], in_flight: Collection[int]) -> list[int]:
    """Micro-batches to start now. ``ready``: those with a sequence that has tokens to feed."""
    if mode is Mode.BUBBLES:
        return sorted(ready) if not in_flight else []
    return sorted(set(ready) - set(in_flight))


def build_step(pending: Mapping[int, Sequence[int]]) -> StepRows:
    """The step for one micro-batch from each slot's tokens to feed (slots in ascending order)."""
    rows = sorted((slot, tuple(tokens)) for slot, tokens in pending.items() if tokens)
    if not rows:
        raise ValueError("a step needs at least one row with tokens")
    width = max(len(tokens) for _, tokens in rows)
    return StepRows(
        slots=tuple(slot for slot, _ in rows),
        tokens=tuple(tokens + (0,) * (width - len(tokens)) for _, tokens in rows),
        lengths=tuple(len(tokens) for _, tokens in rows),
    )


def rows_that_fit(rows: Mapping[int, tuple[int, int]], max_len: int) -> list[int]:
    """The slots whose rows go into the step now. ``rows``: slot -> (positions its cache holds,
    tokens it feeds). Rows are right-padded to the widest and a padded row's cache writes
    reach as far as the width, so a row wider than what the fullest slot has left (a new
    prompt beside a sequence near ``max_len``) waits for a later step; that sequence ends
    within the few tokens it has left. The fullest row itself always fits."""
    room = min(max_len - cached for cached, _ in rows.values())
    return sorted(slot for slot, (_, fed) in rows.items() if fed <= room)


def replay_skips(holds: Sequence[int], n: int) -> tuple[int, ...]:
    """Per stage (source first), how many leading positions of an ``n``-token sequence the
    stage skips in the step that replays it after a re-deployment; ``holds``: the positions
    each stage of the new deployment already holds (0 where freshly loaded, what the
    sequence had accepted where the stage was kept in place with its KV cache).

    A stage computes positions [skip, n) and hands them on, so it must emit every position
    its successor computes (skip_i <= skip_{i+1}) and cannot skip what it lacks
    (skip_i <= holds_i); the last stage computes at least the last position (it draws the
    next token). Each stage skips as much as that allows."""
    if n < 1 or not holds:
        raise ValueError("a replay needs a stage and at least one token")
    skips, bound = [], n - 1
    for held in reversed(holds):
        bound = max(0, min(held, bound))
        skips.append(bound)
    return tuple(reversed(skips))


def choose_slot(layout: Layout, free: Iterable[int], busy: Iterable[int]) -> int | None:
    """A free slot in the micro-batch with the fewest busy slots (keeps micro-batches balanced)."""
    load = [0] * layout.micro_batches
    for slot in busy:
        load[layout.group_of(slot)] += 1
    candidates = sorted(free, key=lambda s: (load[layout.group_of(s)], s))
    return candidates[0] if candidates else None


class ContextFull(ValueError):
    """A turn would overflow its sequence's KV slot (start a new sequence, or a longer cache)."""


def check_turn_fits(tokens: int, max_new_tokens: int, max_len: int) -> None:
    """Raise ContextFull unless ``tokens`` (the sequence after the turn's new tokens) plus
    ``max_new_tokens`` sampled ones fit ``max_len`` cache positions (the last sampled
    token is never fed, so it takes none)."""
    need = tokens + max_new_tokens - 1
    if need > max_len:
        raise ContextFull(f"this turn needs {need} cache positions; the slot holds {max_len}")
