"""One per-client bound on requests in flight, shared by the shard server and the weights holder."""

from __future__ import annotations

from swarm.runtime.perclient import PerClientLimit


def test_each_client_has_its_own_bound_and_a_departed_client_leaves_nothing():
    limit = PerClientLimit(2)
    assert limit.take(b"a") and limit.take(b"a")
    assert not limit.take(b"a")  # the third is refused, and not counted
    assert limit.in_flight(b"a") == 2
    assert limit.take(b"b")  # another client is not held back
    limit.release(b"a")
    assert limit.take(b"a") and not limit.take(b"a")
    for who in (b"a", b"a", b"b"):
        limit.release(who)
    assert limit._busy == {}
    assert limit.refusal() == "too many requests in flight from this client (limit 2)"
