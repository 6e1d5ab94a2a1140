"""Choosing the next token on the stage that holds the head.

Only token ids leave that stage, never logits: 8 bytes instead of vocab x 4. The
randomness belongs to the sequence: each draw uses a generator seeded from
(seed, position), so a sampled answer depends neither on which other sequences
shared its batch nor on how its cache was built (a replay after a lost stage
prefills the whole history at once and still draws the same tokens).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 mean no filtering."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def generator_at(self, position: int, device: torch.device | str = "cpu") -> torch.Generator | None:
        """The generator of the draw that follows ``position`` tokens of the sequence
        (None when greedy; an unseeded sequence draws from fresh entropy)."""
        if self.greedy:
            return None
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(draw_seed(self.seed, position))
        return generator


def draw_seed(seed: int, position: int) -> int:
    """A 64-bit seed per (sequence seed, position): splitmix64 of their combination, so
    neighbouring positions and neighbouring seeds give unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


_MASK64 = (1 << 64) - 1


GREEDY = SamplingParams()


def row_sampling(params: SamplingParams, row: int) -> SamplingParams:
    """The one seed rule for a batch of prompts sharing ``params``: a seeded ``params`` gives
    row ``row`` the seed ``seed + row`` (each prompt its own stream, the same in every run
    and on every path); an unseeded one is left as it is."""
    return params if params.seed is None else dataclasses.replace(params, seed=params.seed + row)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to one row of logits [V] (float32)."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token once the mass before it already reaches top_p; the first always stays.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Next token per row of logits [B, V] -> int64 [B]."""
    tokens = torch.argmax(logits, dim=-1)
    for row, (p, generator) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        probs = torch.softmax(filter_logits(logits[row].float(), p), dim=-1)
        tokens[row] = torch.multinomial(probs, 1, generator=generator)[0]
    return tokens
