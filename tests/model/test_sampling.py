"""Sampling: the seed rule that makes a replayed history draw the same tokens."""

from __future__ import annotations

import pytest
import torch

from swarm.model.sampling import GREEDY, SamplingParams, draw_seed, filter_logits, row_sampling, sample_next


def test_a_seeded_draw_depends_only_on_the_seed_and_the_position():
    """A replay (the same sequence fed again after a lost stage) draws exactly the tokens of the
    first run; another position or another seed draws from another stream."""
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, seed=7)

    def draws(p: SamplingParams, position: int) -> list[int]:
        generator = p.generator_at(position)
        return [int(sample_next(logits, [p], [generator])[0]) for _ in range(20)]

    assert draws(params, 12) == draws(params, 12)
    assert draws(params, 12) != draws(params, 13)
    assert draws(params, 12) != draws(SamplingParams(temperature=1.0, seed=8), 12)
    assert len({draw_seed(7, p) for p in range(1000)}) == 1000
    assert GREEDY.generator_at(5) is None


def test_greedy_takes_the_largest_logit_and_filters_narrow_the_choice():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample_next(logits, [GREEDY], [None]).tolist() == [1]
    top2 = filter_logits(logits[0], SamplingParams(temperature=1.0, top_k=2))
    assert torch.isinf(top2).tolist() == [True, False, True, False]
    nucleus = filter_logits(torch.tensor([0.0, 10.0, 0.0, 0.0]), SamplingParams(temperature=1.0, top_p=0.5))
    assert torch.isfinite(nucleus).tolist() == [False, True, False, False]  # the first token holds the mass


def test_row_sampling_gives_each_prompt_of_a_seeded_batch_its_own_seed():
    assert row_sampling(SamplingParams(temperature=0.8, seed=100), 3).seed == 103
    unseeded = SamplingParams(temperature=0.8)
    assert row_sampling(unseeded, 3) is unseeded


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
