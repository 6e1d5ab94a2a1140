"""A draft model: a small model with the target's tokenizer, whole in the source's process.

    drafts = DraftModel.load(path, slots=4, max_len=512)
    drafter = drafts.drafter(slot)            # a swarm.runtime.speculate.Drafter for one sequence
    drafter.propose(history, k)               # k greedy tokens of the small model, on this thread
    drafter.submit(history, k)                # the same on the model's own thread: a Future
    drafts.close()

The source (which sees every token) runs it on its own CPU as a LocalChain of one
shard, one KV slot per sequence. Each sequence's drafter remembers which tokens its slot
holds: a proposal feeds only what is new since (the accepted tokens), setting the slot
back past drafts the verifier rejected, then decodes k tokens greedily. The verifier
decides every token; a poor draft model costs speed, never a different answer.

One thread owns the draft model (``DraftModel.executor``): the step loop asks for drafts
with ``ModelDrafter.submit``, which runs ``propose`` there, so the event loop answers
while the small model computes, and every slot's cache is touched by that thread only.
"""

from __future__ import annotations

import concurrent.futures
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
        # The one thread that computes with the chain: proposals run in order, never at once.
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="draft-model")

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
        return ModelDrafter(self.chain, slot, self.executor)

    __call__ = drafter  # a Pipeline's drafter factory (slot -> Drafter)

    def close(self) -> None:
        """Stop the draft model's thread once its proposal in hand (if any) is done; idempotent.
        The Pipeline it was given to calls this when it closes."""
        self.executor.shutdown(wait=True, cancel_futures=True)


def load_drafter(path: Path | str, target: Path | str, *, slots: int, max_len: int) -> DraftModel:
    """The draft model at ``path`` for ``target``'s pipeline: a Pipeline's ``drafter`` factory
    (slot -> Drafter, closed with the pipeline). Raises ValueError when the vocabularies differ."""
    model = DraftModel.load(path, slots=slots, max_len=max_len)
    try:
        model.check_drafts_for(target)
    except ValueError:
        model.close()
        raise
    return model


class ModelDrafter:
    """``Drafter`` for one sequence: greedy tokens of the draft model after the sequence's history."""

    def __init__(self, chain: LocalChain, slot: int,
                 executor: concurrent.futures.Executor | None = None) -> None:
        self.chain, self.slot, self.executor = chain, slot, executor
        self.cached: list[int] | None = None  # the tokens the slot holds, in order (None: not opened)

    def submit(self, tokens: Sequence[int], k: int) -> concurrent.futures.Future:
        """``propose`` on the draft model's own thread (the step loop's way: the event loop
        goes on meanwhile); without an executor, at once on this thread."""
        if self.executor is None:
            done: concurrent.futures.Future = concurrent.futures.Future()
            done.set_result(self.propose(tokens, k))
            return done
        return self.executor.submit(self.propose, list(tokens), k)

    @torch.inference_mode()
    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        if self.cached is None:
            # Opened here, by the thread that computes: a new sequence on a slot whose previous
            # sequence's proposal is still running gets it only after that one is done.
            self.chain.open_slot(self.slot)
            self.cached = []
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
