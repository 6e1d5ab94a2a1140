"""Link measurement arithmetic (pure): probe sizes and bandwidth from timed probes.

Bandwidth is the slope between two payload sizes, (s2 - s1) / (t2 - t1): the round
trip, the reply and a token bucket's burst (home routers and `tc tbf` shape this
way) appear in both timings and cancel, so the figure is the rate a long activation
transfer actually gets. Each size is timed several times back to back and the
median kept; the first round only drains the burst and is discarded.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from swarm.discovery.txt import Link

PROBE_INTERVAL_S = 30.0  # between measurements of one link, when nothing changes
PROBE_MIN_BYTES = 32 * 1024  # above any sane token-bucket burst so the slope is linear
PROBE_ROUNDS = 4  # rounds of (small, large); round 0 is discarded
PING_ROUNDS = 5
PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ProbeConfig:
    interval_s: float = PROBE_INTERVAL_S
    min_bytes: int = PROBE_MIN_BYTES
    rounds: int = PROBE_ROUNDS
    ping_rounds: int = PING_ROUNDS
    timeout_s: float = PROBE_TIMEOUT_S


def probe_sizes(activation_bytes: int, config: ProbeConfig) -> tuple[int, int]:
    """The two payload sizes: an activation as the pipeline sends it (at least
    min_bytes, so a burst never hides the rate), and four times that."""
    small = max(int(activation_bytes), config.min_bytes)
    return small, 4 * small


def link_from_timings(rtts: list[float], small: tuple[int, list[float]],
                      large: tuple[int, list[float]]) -> Link:
    """Link figures from ping round trips and timed (size, [seconds]) probe rounds."""
    rtt = min(rtts)
    (s1, t1s), (s2, t2s) = small, large
    t1, t2 = statistics.median(_steady(t1s)), statistics.median(_steady(t2s))
    if t2 > t1 and s2 > s1:
        bandwidth = (s2 - s1) / (t2 - t1)
    else:  # timings below the clock's resolution: fall back to the large payload alone
        bandwidth = s2 / max(t2 - rtt, 1e-9)
    return Link(bandwidth=bandwidth, rtt=rtt)


def _steady(times: list[float]) -> list[float]:
    return times[1:] if len(times) > 1 else times
