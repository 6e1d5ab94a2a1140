"""Heartbeat liveness, decided by pure bookkeeping (the pinging lives in swarm.discovery.peer).

zeroconf keeps a peer killed without a goodbye for about 19 minutes (it raises PTR
TTLs to 1125 s), so the swarm pings every peer itself and drops one after a few
missed heartbeats in a row, however long mDNS still lists it.
"""

from __future__ import annotations

from dataclasses import dataclass

HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_TIMEOUT_S = 0.75
HEARTBEAT_MISSES = 3


@dataclass(frozen=True)
class LivenessConfig:
    interval_s: float = HEARTBEAT_INTERVAL_S  # between heartbeats to one peer
    timeout_s: float = HEARTBEAT_TIMEOUT_S  # a PING not answered within this is a miss
    misses: int = HEARTBEAT_MISSES  # consecutive misses before the peer is dropped

    @property
    def drop_bound_s(self) -> float:
        """Longest time from a peer's death to its removal (plus one interval of phase)."""
        return (self.misses + 1) * (self.interval_s + self.timeout_s)


class Liveness:
    """Consecutive missed heartbeats per peer id; no clocks, no I/O."""

    def __init__(self, config: LivenessConfig) -> None:
        self.config = config
        self._misses: dict[str, int] = {}

    def answered(self, peer_id: str) -> None:
        self._misses[peer_id] = 0

    def missed(self, peer_id: str) -> bool:
        """Record a miss; True when the peer has now missed enough to be dropped."""
        self._misses[peer_id] = self._misses.get(peer_id, 0) + 1
        return self._misses[peer_id] >= self.config.misses

    def forget(self, peer_id: str) -> None:
        self._misses.pop(peer_id, None)
