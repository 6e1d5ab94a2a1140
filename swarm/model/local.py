"""A chain of shards in one process: the reference path every pipeline is checked against.

What the tests and benchmarks compare the pipeline with: the same shard code the
peers run, without sockets or an event loop. No command runs it (`swarm generate`
without a swarm is a source-only pipeline, as chat and serve are).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from swarm.model.sampling import GREEDY, SamplingParams, row_sampling
from swarm.model.shard import Shard
from swarm.model.stopping import turn_finished


def even_cuts(num_units: int, num_shards: int) -> list[tuple[int, int]]:
    """Split units into ``num_shards`` contiguous ranges of near-equal size."""
    if not 1 <= num_shards <= num_units:
        raise ValueError(f"cannot cut {num_units} units into {num_shards} shards")
    bounds = [round(i * num_units / num_shards) for i in range(num_shards + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class LocalChain:
    """Shards run one after another in this process."""

    def __init__(self, shards: Sequence[Shard]):
        if not shards or not shards[0].is_first or not shards[-1].is_last:
            raise ValueError("a chain must start with the embedding and end with the head")
        for a, b in zip(shards, shards[1:]):
            if a.end != b.start:
                raise ValueError(f"shards [{a.start},{a.end}) and [{b.start},{b.end}) are not contiguous")
        self.shards = list(shards)

    @classmethod
    def load(cls, model_dir: Path | str, cuts: Sequence[tuple[int, int]], **shard_kwargs) -> "LocalChain":
        return cls([Shard.load(model_dir, a, b, **shard_kwargs) for a, b in cuts])

    @property
    def max_slots(self) -> int:
        return self.shards[0].max_slots

    def open_slot(self, slot: int, sampling: SamplingParams = GREEDY) -> None:
        for shard in self.shards:
            shard.open_slot(slot, sampling)

    def free_slot(self, slot: int) -> None:
        for shard in self.shards:
            shard.free_slot(slot)

    def step(self, slots: Sequence[int], token_ids: torch.Tensor, lengths: Sequence[int] | None = None,
             keep: Sequence[int] | None = None, draws: Sequence[int] | None = None) -> torch.Tensor:
        """One step through every shard (``Shard.step``'s arguments and result)."""
        data = token_ids
        for shard in self.shards:
            data = shard.step(slots, data, lengths, keep, draws)
        return data


@dataclass
class Request:
    """One sequence being generated: its slot, its prompt, and what it produced so far."""

    slot: int
    prompt: list[int]
    max_new_tokens: int
    stop_ids: frozenset[int] = frozenset()
    generated: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        if not self.generated:
            return self.max_new_tokens <= 0
        return turn_finished(len(self.generated), self.max_new_tokens, self.generated[-1], self.stop_ids)


def pad_right(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Right-pad token rows into int64 [B, T]; returns the tensor and each row's real length."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return out, [len(r) for r in rows]


def stream_generate(chain: LocalChain, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    sampling: SamplingParams = GREEDY, stop_ids: Sequence[int] = ()) -> Iterator[list[tuple[int, int]]]:
    """Generate for a batch of prompts; yields [(row, token)] after every step.

    Rows that finish (max tokens or a stop id) leave the batch at once and free
    their slot, so later steps run only on the rows still going.
    """
    if len(prompts) > chain.max_slots:
        raise ValueError(f"{len(prompts)} prompts but the cache has {chain.max_slots} slots")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    requests = [Request(i, list(p), max_new_tokens, frozenset(stop_ids)) for i, p in enumerate(prompts)]
    for r in requests:
        chain.open_slot(r.slot, row_sampling(sampling, r.slot))
    active = [r for r in requests if r.max_new_tokens > 0]
    inputs, lengths = pad_right([r.prompt for r in active])
    try:
        while active:
            tokens = chain.step([r.slot for r in active], inputs, lengths).tolist()
            for r, token in zip(active, tokens):
                r.generated.append(token)
            yield [(r.slot, t) for r, t in zip(active, tokens)]
            for r in active:
                if r.done:
                    chain.free_slot(r.slot)
            active = [r for r in active if not r.done]
            inputs = torch.tensor([[r.generated[-1]] for r in active], dtype=torch.int64)
            lengths = None
    finally:
        for r in requests:
            chain.free_slot(r.slot)


def generate(chain: LocalChain, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: SamplingParams = GREEDY, stop_ids: Sequence[int] = ()) -> list[list[int]]:
    """Generated token ids (prompt excluded) for each prompt."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in stream_generate(chain, prompts, max_new_tokens, sampling, stop_ids):
        for row, token in step:
            out[row].append(token)
    return out
