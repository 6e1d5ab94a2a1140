"""Requests in flight per client identity, bounded: one rule for every ROUTER that answers requests.

    limit = PerClientLimit(limits.max_requests_per_client)
    if not limit.take(identity):
        refuse(identity, limit.refusal())
    ...                      # the request runs; whatever ends it:
    limit.release(identity)

A ShardServer's control socket and a source's HolderServer both use it, so a member
that floods one of them gets the same error and everyone else keeps being served.
"""

from __future__ import annotations

from collections import Counter


class PerClientLimit:
    """At most ``limit`` requests in flight per identity (only the event loop calls it)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._busy: Counter[bytes] = Counter()

    def take(self, identity: bytes) -> bool:
        """Count one more request from ``identity``; False (and nothing counted) if over the limit."""
        if self._busy[identity] >= self.limit:
            return False
        self._busy[identity] += 1
        return True

    def release(self, identity: bytes) -> None:
        self._busy[identity] -= 1
        if self._busy[identity] <= 0:
            del self._busy[identity]  # a client that went away leaves nothing behind

    def in_flight(self, identity: bytes) -> int:
        return self._busy[identity]

    def refusal(self) -> str:
        return f"too many requests in flight from this client (limit {self.limit})"
