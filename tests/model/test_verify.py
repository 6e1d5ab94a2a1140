"""A verify step (the last token plus k drafts, one batched step) draws what one-at-a-time
decoding draws, and a rejected draft leaves every shard's cache as if it had never been sent."""

from __future__ import annotations

import pytest
import torch

from swarm.model.local import LocalChain, pad_right
from swarm.model.sampling import GREEDY, SamplingParams

PROMPT = [5, 6, 7, 8, 9, 10, 11]
CUTS = [(0, 2), (2, 4), (4, 6)]


def plain_run(chain: LocalChain, slot: int, prompt: list[int], new_tokens: int) -> list[int]:
    """One token per step, as decoding without speculation runs."""
    out = [chain.step([slot], *pad_right([prompt])).item()]
    while len(out) < new_tokens:
        out.append(chain.step([slot], torch.tensor([[out[-1]]])).item())
    return out


def cached(chain: LocalChain, slot: int, length: int) -> list[torch.Tensor]:
    """Every shard's keys and values of ``slot`` up to ``length`` positions."""
    return [t[slot, :, :length].clone() for shard in chain.shards for t in shard.cache.keys + shard.cache.values]


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=1.3, top_k=40, seed=11)],
                         ids=["greedy", "seeded"])
def test_a_rejected_draft_leaves_the_cache_as_if_never_sent(tiny_model_dir, sampling):
    reference = LocalChain.load(tiny_model_dir, CUTS, max_slots=1, max_len=64)
    reference.open_slot(0, sampling)
    expected = plain_run(reference, 0, PROMPT, 12)

    chain = LocalChain.load(tiny_model_dir, CUTS, max_slots=1, max_len=64)
    chain.open_slot(0, sampling)
    assert chain.step([0], *pad_right([PROMPT])).item() == expected[0]
    wrong = (expected[2] + 1) % 256
    # The last token, a right draft, a wrong one and one after it: width 4, drawn at all 4 positions.
    draws = chain.step([0], torch.tensor([[expected[0], expected[1], wrong, 3]]), draws=[4])
    assert draws.shape == (1, 4)
    assert draws[0, :2].tolist() == expected[1:3]  # the draws after the last token and the right draft
    kept = len(PROMPT) + 2  # the prompt, the last token, the right draft
    assert all(shard.slot_length(0) == kept + 2 for shard in chain.shards)  # until the next step says keep

    # The next step carries the drop: from position `kept` on, as if the wrong draft never went.
    got = [chain.step([0], torch.tensor([[expected[2]]]), keep=[kept]).item()]
    assert all(shard.slot_length(0) == kept + 1 for shard in chain.shards)
    while len(got) < 9:
        got.append(chain.step([0], torch.tensor([[got[-1]]])).item())
    assert got == expected[3:]
    length = len(PROMPT) + 11
    for mine, theirs in zip(cached(chain, 0, length), cached(reference, 0, length)):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_verifying_and_plain_rows_share_a_step(tiny_model_dir):
    sampling = SamplingParams(temperature=0.8, seed=3)
    other = [20, 21, 22]
    reference = LocalChain.load(tiny_model_dir, CUTS, max_slots=2, max_len=64)
    for slot in (0, 1):
        reference.open_slot(slot, sampling)
    first, second = plain_run(reference, 0, PROMPT, 8), plain_run(reference, 1, other, 8)

    chain = LocalChain.load(tiny_model_dir, CUTS, max_slots=2, max_len=64)
    for slot in (0, 1):
        chain.open_slot(slot, sampling)
    assert chain.step([0, 1], *pad_right([PROMPT, other])).tolist() == [first[0], second[0]]
    # Row 0 verifies 3 right drafts (all accepted); row 1 decodes one token, right-padded.
    inputs, lengths = pad_right([[first[0], *first[1:4]], [second[0]]])
    out = chain.step([0, 1], inputs, lengths, keep=[len(PROMPT), len(other)], draws=[4, 1])
    assert out[0].tolist() == first[1:5]
    assert out[1].tolist() == [second[1], -1, -1, -1]


def test_keep_cannot_reach_past_what_the_slot_holds(tiny_model_dir):
    chain = LocalChain.load(tiny_model_dir, [(0, 6)], max_slots=1, max_len=64)
    chain.open_slot(0)
    chain.step([0], *pad_right([PROMPT]))
    with pytest.raises(ValueError, match="cannot keep"):
        chain.step([0], torch.tensor([[1]]), keep=[len(PROMPT) + 1])
    with pytest.raises(ValueError, match="draws"):
        chain.step([0], torch.tensor([[1, 2]]), draws=[3])
