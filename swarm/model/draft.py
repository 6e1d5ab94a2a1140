"""A draft model: a small model with the target's tokenizer, whole in the source's process.

    drafts = DraftModel.load(path, slots=4, max_len=512)
    drafter = drafts.drafter(slot)            # a swarm.runtime.speculate.Drafter for one sequence
    drafter.propose(history, k)               # k greedy tokens of the small model

The source (which sees every token) runs it on its own CPU as a LocalChain of one
shard, one KV slot per sequence. Each sequence's drafter remembers which tokens its slot
holds: a proposal feeds only what is new since (the accepted tokens), setting the slot
back past drafts the verifier rejected, then decodes k tokens greedily. The verifier
decides every token; a poor draft model costs speed, never a different answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from swarm.model.local import LocalChain
from swarm.model.units import ModelLayout


class DraftModel:
    """The draft model and its KV slots (one per sequence slot of the pipeline)."""

    def __init__(self, chain: LocalChain, vocab_size: int) -> None:
        self.chain = chain
        self.vocab_size = vocab_size

    @classmethod
    def load(cls, path: Path | str, *, slots: int, max_len: int, dtype: str = "float32") -> "DraftModel":
        layout = ModelLayout.read(Path(path))
        chain = LocalChain.load(path, [(0, layout.num_units)], max_slots=slots, max_len=max_len, dtype=dtype)
        return cls(chain, layout.vocab_size)

    def check_drafts_for(self, target: Path | str) -> None:
        """Raise ValueError unless the target model has this one's vocabulary (the same tokenizer)."""
        theirs = ModelLayout.read(Path(target)).vocab_size
        if theirs != self.vocab_size:
            raise ValueError(f"the draft model's vocabulary has {self.vocab_size} tokens, the model's {theirs}: "
                             "a draft model needs the same tokenizer")

    def drafter(self, slot: int) -> "ModelDrafter":
        return ModelDrafter(self.chain, slot)


def load_drafter(path: Path | str, target: Path | str, *, slots: int, max_len: int):
    """The draft model at ``path`` for ``target``'s pipeline: a Pipeline's ``drafter`` factory
    (slot -> Drafter). Raises ValueError when the vocabularies differ."""
    model = DraftModel.load(path, slots=slots, max_len=max_len)
    model.check_drafts_for(target)
    return model.drafter


class ModelDrafter:
    """``Drafter`` for one sequence: greedy tokens of the draft model after the sequence's history."""

    def __init__(self, chain: LocalChain, slot: int) -> None:
        self.chain, self.slot = chain, slot
        self.cached: list[int] = []  # the tokens the slot holds, in order
        chain.open_slot(slot)

    @torch.inference_mode()
    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        if k <= 0 or not tokens:
            return []
        room = self.chain.shards[0].max_len - len(tokens)
        k = min(k, room)
        if k <= 0:
            return []
        # Keep what the slot holds of this history (never all of it: the last token is fed again).
        same = 0
        limit = min(len(self.cached), len(tokens) - 1)
        while same < limit and self.cached[same] == tokens[same]:
            same += 1
        new = list(tokens[same:])
        token = self.chain.step([self.slot], torch.tensor([new]), keep=[same]).item()
        self.cached = list(tokens)
        drafts = [token]
        while len(drafts) < k:
            self.cached.append(drafts[-1])
            drafts.append(self.chain.step([self.slot], torch.tensor([[drafts[-1]]])).item())
        return drafts
