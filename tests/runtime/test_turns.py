"""The turn's state machine (swarm/runtime/turns.py): every event in every state, no sockets."""

from __future__ import annotations

import itertools

import pytest

from swarm.runtime.turns import Action, IllegalTransition, TurnEvent, TurnState, transition

S, E, A = TurnState, TurnEvent, Action

# The whole machine, written out again by hand: (state, event) -> (new state, actions); None: illegal.
EXPECTED = {
    S.IDLE: {E.START: (S.WAITING, ()), E.LAUNCH: None, E.TOKEN: None, E.END: (S.IDLE, ()),
             E.STEP_FAILED: None, E.FORGET: None, E.CLOSE: (S.CLOSED, (A.RELEASE_SLOT,))},
    S.WAITING: {E.START: None, E.LAUNCH: (S.IN_FLIGHT, ()), E.TOKEN: None, E.END: (S.IDLE, (A.END_STREAM,)),
                E.STEP_FAILED: None, E.FORGET: None, E.CLOSE: (S.CLOSED, (A.END_STREAM, A.RELEASE_SLOT))},
    S.IN_FLIGHT: {E.START: None, E.LAUNCH: None, E.TOKEN: (S.WAITING, (A.DELIVER,)),
                  E.END: (S.CANCELLING, (A.END_STREAM,)), E.STEP_FAILED: (S.IDLE, (A.END_STREAM,)),
                  E.FORGET: (S.WAITING, ()),
                  E.CLOSE: (S.CLOSED, (A.END_STREAM, A.AWAIT_STEP, A.RELEASE_SLOT))},
    S.CANCELLING: {E.START: None, E.LAUNCH: None, E.TOKEN: (S.IDLE, ()), E.END: (S.CANCELLING, ()),
                   E.STEP_FAILED: (S.IDLE, ()), E.FORGET: (S.IDLE, ()),
                   E.CLOSE: (S.CLOSED, (A.AWAIT_STEP, A.RELEASE_SLOT))},
    S.CLOSED: {E.START: None, E.LAUNCH: None, E.TOKEN: (S.CLOSED, ()), E.END: (S.CLOSED, ()),
               E.STEP_FAILED: (S.CLOSED, ()), E.FORGET: (S.CLOSED, ()), E.CLOSE: (S.CLOSED, ())},
}


def test_the_expectation_covers_every_event_in_every_state():
    assert {(s, e) for s in EXPECTED for e in EXPECTED[s]} == set(itertools.product(TurnState, TurnEvent))


@pytest.mark.parametrize("state,event", list(itertools.product(TurnState, TurnEvent)),
                         ids=lambda x: x.name)
def test_every_event_in_every_state(state, event):
    expected = EXPECTED[state][event]
    if expected is None:
        with pytest.raises(IllegalTransition):
            transition(state, event)
    else:
        got = transition(state, event)
        assert (got.state, got.actions) == expected


def run(events, state=S.IDLE):
    """Apply events in order; returns the final state and every action, in order."""
    actions = []
    for event in events:
        step = transition(state, event)
        state = step.state
        actions += step.actions
    return state, actions


def test_a_turn_of_three_tokens():
    state, actions = run([E.START] + [E.LAUNCH, E.TOKEN] * 3 + [E.END])
    assert state is S.IDLE and actions == [A.DELIVER] * 3 + [A.END_STREAM]


def test_a_cancelled_turn_drops_the_token_in_flight_and_can_start_again():
    state, actions = run([E.START, E.LAUNCH, E.END, E.TOKEN, E.START])
    assert state is S.WAITING and A.DELIVER not in actions


def test_a_turn_cancelled_during_a_recovery_can_start_again():
    """The step of a cancelled turn forgotten by a recovery never lands: the sequence is IDLE at once
    (it used to stay CANCELLING, refusing the next turn)."""
    state, _ = run([E.START, E.LAUNCH, E.END, E.FORGET, E.START])
    assert state is S.WAITING


def test_a_recovery_relaunches_the_turn_and_its_token_still_comes():
    state, actions = run([E.START, E.LAUNCH, E.FORGET, E.LAUNCH, E.TOKEN])
    assert state is S.WAITING and actions == [A.DELIVER]


def test_closing_mid_step_waits_for_the_step_and_drops_its_token():
    state, actions = run([E.START, E.LAUNCH, E.CLOSE, E.TOKEN, E.CLOSE])
    assert state is S.CLOSED and actions == [A.END_STREAM, A.AWAIT_STEP, A.RELEASE_SLOT]


def test_a_failed_step_fails_the_turn_once():
    state, actions = run([E.START, E.LAUNCH, E.STEP_FAILED, E.END])
    assert state is S.IDLE and actions == [A.END_STREAM]


@pytest.mark.parametrize("events,message", [
    ([E.START, E.START], "already running"),
    ([E.CLOSE, E.START], "session is closed"),
    ([E.TOKEN], "token while idle"),
    ([E.START, E.TOKEN], "token while waiting"),
])
def test_illegal_events_say_why(events, message):
    with pytest.raises(IllegalTransition, match=message):
        run(events)
