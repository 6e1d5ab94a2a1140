"""The pure pieces of speculative decoding: prompt lookup, acceptance, adaptive k."""

from __future__ import annotations

import random

import pytest

from swarm.runtime.speculate import (MAX_REST_STEPS, REST_STEPS, DraftLength, LookupDrafter, Speculator, accept,
                                     best_draft, expected_tokens, fit_drafts, lookup_draft)


# ---------------------------------------------------------------- prompt lookup

def test_lookup_proposes_what_followed_the_last_ngram():
    #          0  1  2  3  4  5  6  7  8
    tokens = [10, 11, 12, 13, 14, 99, 10, 11, 12]
    assert lookup_draft(tokens, 2) == [13, 14]
    assert lookup_draft(tokens, 5) == [13, 14, 99, 10, 11]
    assert lookup_draft(tokens, 0) == []


def test_lookup_prefers_the_longest_ngram_then_the_first_occurrence():
    # [7, 8] occurs at 0, 4 and 8; the 3-gram [3, 7, 8] only at 3 (before the end).
    tokens = [7, 8, 1, 3, 7, 8, 2, 5, 7, 8, 4, 9, 3, 7, 8]
    assert lookup_draft(tokens, 1, max_ngram=3) == [2]  # the 3-gram [3, 7, 8] beats the earlier 2-gram
    assert lookup_draft(tokens, 1, max_ngram=2) == [1]  # the first [7, 8]: the given text, not the answer's echo
    assert lookup_draft([1, 2, 1, 3, 1, 4, 9, 1], 1, max_ngram=1, min_ngram=1) == [2]


def test_lookup_finds_nothing_without_a_repeat_or_below_min_ngram():
    assert lookup_draft(list(range(50)), 4) == []
    assert lookup_draft([5, 6, 1, 7, 6], 3) == []  # only the 1-gram [6] repeats: below MIN_NGRAM
    assert lookup_draft([5, 6, 1, 7, 6], 3, min_ngram=1) == [1, 7, 6]
    assert lookup_draft([], 3) == [] and lookup_draft([4], 3) == []


def test_lookup_matches_a_brute_force_search():
    rng = random.Random(1)
    for _ in range(300):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        k = rng.randrange(0, 6)
        expected: list[int] = []
        if k:
            for n in range(min(3, len(tokens) - 1), 1, -1):
                starts = [i for i in range(len(tokens) - n) if tokens[i:i + n] == tokens[-n:]]
                if starts:
                    expected = tokens[starts[0] + n:starts[0] + n + k]
                    break
        assert lookup_draft(tokens, k) == expected, (tokens, k)


def test_a_repeating_text_is_drafted_right():
    # A text with a phrase said twice: once the phrase starts again, lookup drafts its rest.
    phrase = [40, 41, 42, 43, 44, 45]
    tokens = [1, 2, *phrase, 3, 4, *phrase[:2]]
    assert LookupDrafter().propose(tokens, 4) == phrase[2:6]


# ---------------------------------------------------------------- acceptance

def test_accept_takes_the_matching_prefix_and_the_next_draw():
    assert accept([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]  # all accepted, plus the bonus draw
    assert accept([5, 6, 7], [5, 9, 7, 8]) == [5, 9]  # the first mismatch is replaced by the draw
    assert accept([5, 6, 7], [4, 6, 7, 8]) == [4]  # nothing accepted: one token, as a plain step
    assert accept([], [3]) == [3]  # no drafts: a plain step


def test_accept_needs_one_draw_more_than_drafts():
    with pytest.raises(ValueError):
        accept([1, 2], [1, 2])


def test_accepted_tokens_are_always_the_verifiers_draws():
    # Whatever the drafts, the tokens yielded are a prefix of what the verifier drew: the plain run's.
    rng = random.Random(2)
    for _ in range(500):
        k = rng.randrange(0, 6)
        drafts = [rng.randrange(3) for _ in range(k)]
        draws = [rng.randrange(3) for _ in range(k + 1)]
        got = accept(drafts, draws)
        assert got == draws[:len(got)] and 1 <= len(got) <= k + 1
        assert got[:-1] == drafts[:len(got) - 1]


# ---------------------------------------------------------------- adaptive k

def test_k_grows_while_everything_is_accepted_and_shrinks_to_what_was():
    length = DraftLength(max_k=8, k=2)
    assert length.next() == 2
    length.verified(2, 2)
    assert length.next() == 4
    length.verified(4, 4)
    assert length.next() == 8
    length.verified(8, 8)
    assert length.next() == 8  # capped
    length.verified(8, 3)
    assert length.next() == 4  # accepted + 1
    length.verified(2, 2)  # the drafter had only 2: k is not cut by it
    assert length.next() == 4


def test_nothing_accepted_rests_with_a_growing_rest_and_acceptance_resets_it():
    length = DraftLength(max_k=8, k=4)
    length.verified(4, 0)
    assert length.next() == 2
    length.verified(2, 0)
    assert length.next() == 1
    length.verified(1, 0)
    assert [length.next() for _ in range(REST_STEPS)] == [0] * REST_STEPS  # no drafts: plain steps
    assert length.next() == 1  # then one probe
    length.verified(1, 0)
    assert [length.next() for _ in range(2 * REST_STEPS)] == [0] * (2 * REST_STEPS)
    assert length.next() == 1
    length.verified(1, 1)  # something accepted: growing again, and the rest is short again
    assert length.next() == 2
    length.verified(2, 0)
    length.verified(1, 0)
    assert [length.next() for _ in range(REST_STEPS)] == [0] * REST_STEPS


def test_the_rest_is_bounded():
    length = DraftLength(max_k=1, k=1)
    for _ in range(20):
        while length.next() == 0:
            pass
        length.verified(1, 0)
    assert length.rest == MAX_REST_STEPS


def test_a_text_with_nothing_to_look_up_drafts_nothing():
    # Lookup on a text that never repeats proposes nothing: every step is a plain one.
    speculator = Speculator(LookupDrafter())
    tokens: list[int] = []
    for t in range(200):
        tokens.append(t)
        assert speculator.propose(tokens, 10) == []


def test_speculator_respects_the_limit_and_max_k_zero():
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]
    assert Speculator(LookupDrafter()).propose(tokens, 2) == [3, 4]
    assert Speculator(LookupDrafter()).propose(tokens, 0) == []
    assert Speculator(LookupDrafter(), DraftLength(max_k=0)).propose(tokens, 5) == []


# ---------------------------------------------------------------- what a wider step costs

def test_best_draft_weighs_expected_tokens_against_the_cost_of_width():
    linear = [1.0 + i for i in range(9)]  # as if width k + 1 cost k + 1 decode steps: never worth it
    assert best_draft(0.9, linear, 8) == 0
    flat = [1.0] * 9  # a step costs the same at any width (weight-bound, or hops dominate)
    assert best_draft(0.5, flat, 8) == 8
    assert best_draft(0.0, flat, 8) == 0  # nothing would be accepted: no drafts
    cpu = [1.0 + 0.25 * i for i in range(9)]  # each extra position a quarter of a step
    assert best_draft(0.2, cpu, 8) == 0
    assert 2 <= best_draft(0.8, cpu, 8) <= 8
    assert best_draft(0.8, cpu, 3) <= 3
    assert expected_tokens(0.5, 2) == 1.75 and expected_tokens(0.0, 5) == 1.0


def test_step_costs_cap_k_by_the_sequences_acceptance():
    cpu = tuple(1.0 + 0.25 * i for i in range(9))
    length = DraftLength(max_k=8, k=8, costs=cpu, rate=0.9)
    assert length.next() == best_draft(0.9, cpu, 8) >= 4
    for _ in range(6):
        length.verified(4, 1)  # a quarter accepted: the rate falls, and with it k
    assert length.rate < 0.35 and length.next() <= 2
    assert DraftLength(costs=tuple(1.0 + i for i in range(9)), rate=0.9).next() == 1  # probes, never 0 unasked


def test_drafts_are_cut_so_a_padded_row_stays_inside_its_slot():
    # Slot lengths 60 and 10 of 64: the step may be 4 wide at most (the first row's padding).
    assert fit_drafts([(60, 1, [7, 7]), (10, 1, [1, 2, 3, 4, 5, 6, 7, 8])], 64) == [[7, 7], [1, 2, 3]]
    assert fit_drafts([(10, 1, [1, 2]), (20, 1, [3])], 64) == [[1, 2], [3]]  # room enough
    assert fit_drafts([(63, 1, [9])], 64) == [[]]  # the last position: no draft fits
    assert fit_drafts([(0, 30, [1]), (40, 1, [2])], 64) == [[], [2]]  # a long prompt already fills the width
