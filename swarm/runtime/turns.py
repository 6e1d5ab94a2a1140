"""A sequence's turn as a state machine: one pure, table-driven transition function.

    new = transition(state, event)      # -> Transition(state, actions), or IllegalTransition

A sequence is IDLE between turns. A turn starts it WAITING (it has tokens to feed);
launching its micro-batch puts it IN_FLIGHT; the token that comes back makes it
WAITING again (the turn goes on) and ENDing the turn makes it IDLE. A turn that
ends while its step is still out (the consumer left, or cancelled) is CANCELLING
until that step lands or is forgotten; its token is then dropped. CLOSED is final.

Nothing here awaits, sends or touches a queue: the pipeline (swarm.runtime.engine)
and the session (swarm.runtime.session) apply the transition and carry out its
actions, so every path through a turn is in the table below and tested without sockets.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class TurnState(enum.Enum):
    IDLE = "idle"  # no turn
    WAITING = "waiting"  # a turn with tokens to feed, its micro-batch not launched yet
    IN_FLIGHT = "in flight"  # its step is out; the token it brings back goes to the turn
    CANCELLING = "cancelling"  # the turn ended with its step out; that step's token will be dropped
    CLOSED = "closed"  # the session is closed (a step still out is dropped when it lands)


class TurnEvent(enum.Enum):
    START = "start"  # a turn begins (Session.generate)
    LAUNCH = "launch"  # the sequence's micro-batch step was sent
    TOKEN = "token"  # that step's token landed (or its accepted tokens, after a verify step)
    END = "end"  # the turn's stream ends: its last token, the consumer left or cancelled, an error
    STEP_FAILED = "step failed"  # the step failed in the source for a reason of its own: the turn fails
    FORGET = "forget"  # the step was forgotten by a recovery (the replay computes its token again)
    CLOSE = "close"  # the session closes


class Action(enum.Enum):
    DELIVER = "deliver"  # append the token to the sequence and hand it to the turn's consumer
    END_STREAM = "end stream"  # the consumer's stream ends (with the turn's error, if there is one)
    AWAIT_STEP = "await step"  # a step is still out: let it land or be forgotten before going on
    RELEASE_SLOT = "release slot"  # free the sequence's slot on every stage


class IllegalTransition(RuntimeError):
    """An event that cannot happen in this state (a turn started twice, a token nobody launched)."""


@dataclass(frozen=True)
class Transition:
    state: TurnState
    actions: tuple[Action, ...] = ()


_S, _E, _A = TurnState, TurnEvent, Action
TABLE: dict[tuple[TurnState, TurnEvent], Transition] = {
    (_S.IDLE, _E.START): Transition(_S.WAITING),
    (_S.IDLE, _E.END): Transition(_S.IDLE),  # no turn to end
    (_S.IDLE, _E.CLOSE): Transition(_S.CLOSED, (_A.RELEASE_SLOT,)),

    (_S.WAITING, _E.LAUNCH): Transition(_S.IN_FLIGHT),
    (_S.WAITING, _E.END): Transition(_S.IDLE, (_A.END_STREAM,)),
    (_S.WAITING, _E.CLOSE): Transition(_S.CLOSED, (_A.END_STREAM, _A.RELEASE_SLOT)),

    (_S.IN_FLIGHT, _E.TOKEN): Transition(_S.WAITING, (_A.DELIVER,)),  # END follows if it was the last
    (_S.IN_FLIGHT, _E.END): Transition(_S.CANCELLING, (_A.END_STREAM,)),
    (_S.IN_FLIGHT, _E.STEP_FAILED): Transition(_S.IDLE, (_A.END_STREAM,)),
    (_S.IN_FLIGHT, _E.FORGET): Transition(_S.WAITING),  # the replay feeds what the step fed
    (_S.IN_FLIGHT, _E.CLOSE): Transition(_S.CLOSED, (_A.END_STREAM, _A.AWAIT_STEP, _A.RELEASE_SLOT)),

    (_S.CANCELLING, _E.TOKEN): Transition(_S.IDLE),  # the cancelled turn's token is dropped
    (_S.CANCELLING, _E.END): Transition(_S.CANCELLING),  # already ended
    (_S.CANCELLING, _E.STEP_FAILED): Transition(_S.IDLE),
    (_S.CANCELLING, _E.FORGET): Transition(_S.IDLE),
    (_S.CANCELLING, _E.CLOSE): Transition(_S.CLOSED, (_A.AWAIT_STEP, _A.RELEASE_SLOT)),

    (_S.CLOSED, _E.TOKEN): Transition(_S.CLOSED),  # dropped
    (_S.CLOSED, _E.END): Transition(_S.CLOSED),
    (_S.CLOSED, _E.STEP_FAILED): Transition(_S.CLOSED),
    (_S.CLOSED, _E.FORGET): Transition(_S.CLOSED),
    (_S.CLOSED, _E.CLOSE): Transition(_S.CLOSED),  # closing twice is a no-op
}
del _S, _E, _A


def transition(state: TurnState, event: TurnEvent) -> Transition:
    """The state after ``event`` and what to do about it; IllegalTransition if it cannot happen."""
    try:
        return TABLE[state, event]
    except KeyError:
        raise IllegalTransition(_why(state, event)) from None


def _why(state: TurnState, event: TurnEvent) -> str:
    if event is TurnEvent.START:
        return "session is closed" if state is TurnState.CLOSED else "a turn is already running in this session"
    return f"{event.value} while {state.value}"
