"""Pure scheduling decisions."""

from __future__ import annotations

import pytest

from swarm.model.stopping import turn_finished
from swarm.runtime.schedule import (Layout, Mode, build_step, choose_slot, groups_to_launch, replay_skips,
                                    rows_that_fit)


def test_no_bubbles_launches_every_returned_micro_batch_at_once():
    assert groups_to_launch(Mode.NO_BUBBLES, ready={0, 1, 3}, in_flight={1, 2}) == [0, 3]


def test_bubbles_waits_for_every_micro_batch():
    assert groups_to_launch(Mode.BUBBLES, ready={0, 1}, in_flight={2}) == []
    assert groups_to_launch(Mode.BUBBLES, ready={2, 0, 1}, in_flight=set()) == [0, 1, 2]


def test_build_step_pads_rows_and_keeps_their_lengths():
    step = build_step({5: [7], 4: [1, 2, 3], 6: []})
    assert step.slots == (4, 5)
    assert step.tokens == ((1, 2, 3), (7, 0, 0))
    assert step.lengths == (3, 1) and step.width == 3 and not step.uniform
    assert build_step({0: [9], 1: [8]}).uniform
    with pytest.raises(ValueError):
        build_step({0: []})


def test_choose_slot_balances_micro_batches():
    layout = Layout(micro_batches=2, batch_size=2)  # slots 0,1 | 2,3
    assert layout.slots == 4 and layout.group_of(3) == 1
    assert choose_slot(layout, free=[1, 2, 3], busy=[0]) == 2
    assert choose_slot(layout, free=[1, 3], busy=[0, 2]) == 1
    assert choose_slot(layout, free=[], busy=[0, 1, 2, 3]) is None


def test_turn_finishes_on_count_or_stop_token():
    assert turn_finished(3, 3, 10, ())
    assert turn_finished(1, 3, 2, {2})
    assert not turn_finished(1, 3, 10, {2})


def test_a_row_wider_than_the_fullest_slot_has_left_waits():
    # Slot 0 holds 62 of 64 positions: a 5-token prompt in slot 1 would pad slot 0 past its end.
    assert rows_that_fit({0: (62, 1), 1: (0, 5)}, 64) == [0]
    assert rows_that_fit({0: (59, 1), 1: (0, 5)}, 64) == [0, 1]
    assert rows_that_fit({0: (10, 1), 1: (0, 30), 2: (20, 1)}, 64) == [0, 1, 2]
    assert rows_that_fit({3: (0, 64)}, 64) == [3]  # alone, a row that fills its slot goes


@pytest.mark.parametrize("holds, n, skips", [
    ((0, 0, 0), 9, (0, 0, 0)),  # every stage fresh: the whole sequence everywhere
    ((9, 9, 9), 10, (9, 9, 9)),  # every stage kept: only the missing position
    ((9, 9, 9), 9, (8, 8, 8)),  # ... and the last stage computes at least the last position
    ((9, 0, 9), 10, (0, 0, 9)),  # a fresh stage in the middle: upstream emits all, the kept one after it skips
    ((9, 9, 0), 10, (0, 0, 0)),  # the last stage fresh: everything upstream replays for it
    ((0, 9, 9), 10, (0, 9, 9)),  # the source reloaded: the kept stages after it skip what they hold
    ((5, 7, 6), 10, (5, 6, 6)),  # a stage never skips past its successor, nor past what it holds
    ((4,), 4, (3,)),  # the source alone, holding everything: it recomputes the last position to draw
])
def test_replay_skips_each_stage_what_it_and_every_stage_after_it_hold(holds, n, skips):
    assert replay_skips(holds, n) == skips


def test_replay_skips_needs_a_token_and_a_stage():
    with pytest.raises(ValueError):
        replay_skips((3, 3), 0)
    with pytest.raises(ValueError):
        replay_skips((), 5)
