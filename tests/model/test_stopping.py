"""The one stop rule (swarm/model/stopping.py) and the one seed rule (sampling.row_sampling)."""

from __future__ import annotations

from swarm.model.sampling import SamplingParams, row_sampling
from swarm.model.stopping import finish_reason, stop_token_ids, turn_finished


class Vocab:
    """A tokenizer's stop-related surface: an eos id and a few named tokens."""

    unk_token_id = 3

    def __init__(self, eos: int | None, tokens: dict[str, int]) -> None:
        self.eos_token_id, self.tokens = eos, tokens

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.tokens.get(token, self.unk_token_id)


def test_the_stop_set_is_eos_end_of_turn_tokens_and_the_generation_config():
    vocab = Vocab(2, {"<|im_end|>": 7, "<|eot_id|>": 9})
    assert stop_token_ids(vocab) == {2, 7, 9}
    assert stop_token_ids(vocab, (11, 2)) == {2, 7, 9, 11}
    assert stop_token_ids(Vocab(None, {})) == frozenset()  # unknown tokens are not stops


def test_a_turn_ends_on_a_stop_token_or_at_its_length():
    assert finish_reason(1, 5, 7, {7}) == "stop"
    assert finish_reason(5, 5, 7, {7}) == "stop"  # a stop token at the limit is still a stop
    assert finish_reason(5, 5, 8, {7}) == "length"
    assert finish_reason(4, 5, 8, {7}) is None
    assert turn_finished(4, 5, 7, {7}) and not turn_finished(4, 5, 8, {7})


def test_row_i_of_a_seeded_batch_draws_with_seed_plus_i():
    seeded = SamplingParams(0.8, 20, 0.9, seed=100)
    assert row_sampling(seeded, 3) == SamplingParams(0.8, 20, 0.9, seed=103)
    unseeded = SamplingParams(0.8)
    assert row_sampling(unseeded, 3) is unseeded
