"""swarm chat's notices of recoveries: each shown once, however many the source has dropped."""

from __future__ import annotations

from swarm.cli.chat import unseen_recoveries
from swarm.runtime.recovery import RecoveryEvent
from swarm.source import RECOVERIES_KEPT, SourceConfig, SwarmSource


def _event(name: str) -> RecoveryEvent:
    return RecoveryEvent((name,), peers=1, detection_s=0.1, redeploy_s=0.2, replay_s=0.3, sequences=1)


def test_recoveries_are_numbered_by_the_source_and_shown_after_the_last_number_seen():
    """Past RECOVERIES_KEPT the source's list stops growing; numbering by index would show
    nothing more (the list's length never passes what was shown). Numbers go on."""
    source = SwarmSource(SourceConfig(interfaces=["127.0.0.1"]))
    shown, seen = 0, []
    for i in range(1, RECOVERIES_KEPT + 6):
        source._record_recovery(_event(f"peer-{i}"))  # the pipeline's on_recovery
        events = source.state().recoveries
        for event in unseen_recoveries(events, shown):
            seen.append(event.lost[0])
            shown = event.number
    assert len(events) == RECOVERIES_KEPT
    assert seen == [f"peer-{i}" for i in range(1, RECOVERIES_KEPT + 6)]
    assert unseen_recoveries(events, shown) == []
    # Two at once between looks: both shown, in order.
    source._record_recovery(_event("a"))
    source._record_recovery(_event("b"))
    assert [e.lost[0] for e in unseen_recoveries(source.state().recoveries, shown)] == ["a", "b"]
