"""Link measurement arithmetic (pure): probe sizes and bandwidth from timed probes.

Bandwidth is the slope between two payload sizes, (s2 - s1) / (t2 - t1): the round
trip, the reply and a token bucket's burst (home routers and `tc tbf` shape this
way) appear in both timings and cancel, so the figure is the rate a long activation
transfer actually gets. Each size is timed several times back to back and the
fastest kept (other traffic on the link, such as another peer's probe queued in
front of our replies, only ever adds time); the first round only drains the burst
and is discarded.
"""

from __future__ import annotations

from dataclasses import dataclass

from swarm.discovery.txt import Link

PROBE_INTERVAL_S = 30.0  # between measurements of one link, when nothing changes
PROBE_MIN_BYTES = 32 * 1024  # above any sane token-bucket burst so the slope is linear
PROBE_MAX_BYTES = 64 * 1024  # a huge prefill activation is timed by its first 64 KiB: probes stay light
PROBE_ROUNDS = 3  # rounds of (small, large); round 0 is discarded
PING_ROUNDS = 5
PROBE_TIMEOUT_S = 10.0
PROBE_HISTORY = 3  # measurements per link kept; the link's figure is the best of them
PROBE_SETTLE_S = 3.0  # a new link's second measurement comes this soon (peers that meet probe all at once)
PROBE_MAX_DEFER = 3  # intervals a refresh may wait while a generation is running
PROBE_JITTER = 0.25  # intervals vary by +-25% so peers' probes into one peer rarely coincide
# A refresh of a link already measured keeps its large payload within this much of the link's
# time: at 1 Mbit/s the default sizes held the link for 2 s per direction, and tokens queued
# behind them (measured on the testbed: +50% ms/token at 1 Mbit/s with 6 s probe intervals).
PROBE_LINK_TIME_S = 0.05
PROBE_FLOOR_BYTES = 4 * 1024  # the small payload never goes below this (a few frames)


@dataclass(frozen=True)
class ProbeConfig:
    interval_s: float = PROBE_INTERVAL_S
    min_bytes: int = PROBE_MIN_BYTES
    max_bytes: int = PROBE_MAX_BYTES
    rounds: int = PROBE_ROUNDS
    ping_rounds: int = PING_ROUNDS
    timeout_s: float = PROBE_TIMEOUT_S
    history: int = PROBE_HISTORY
    jitter: float = PROBE_JITTER
    max_defer: int = PROBE_MAX_DEFER
    settle_s: float = PROBE_SETTLE_S
    link_time_s: float = PROBE_LINK_TIME_S
    floor_bytes: int = PROBE_FLOOR_BYTES


def probe_sizes(activation_bytes: int, config: ProbeConfig, known_bandwidth: float = 0.0) -> tuple[int, int]:
    """The two payload sizes: an activation as the pipeline sends it (at least
    min_bytes, so a burst never hides the rate; at most max_bytes, so probes stay light), and
    four times that. On a link already measured (``known_bandwidth`` bytes/s) the large one
    takes at most ``link_time_s`` of it, the small one not below ``floor_bytes``: the
    discarded first round drains a token bucket's burst, so smaller payloads keep the slope."""
    small = min(max(int(activation_bytes), config.min_bytes), config.max_bytes)
    if known_bandwidth > 0:
        small = min(small, max(int(known_bandwidth * config.link_time_s) // 4, config.floor_bytes))
    return small, 4 * small


def link_from_timings(rtts: list[float], small: tuple[int, list[float]],
                      large: tuple[int, list[float]]) -> Link:
    """Link figures from ping round trips and timed (size, [seconds]) probe rounds."""
    rtt = min(rtts)
    (s1, t1s), (s2, t2s) = small, large
    t1, t2 = min(_steady(t1s)), min(_steady(t2s))
    # The large payload alone bounds the slope from above: other traffic delaying only
    # the small probes would otherwise shrink t2 - t1 and inflate the figure.
    alone = s2 / max(t2 - rtt, 1e-9)
    bandwidth = min((s2 - s1) / (t2 - t1), alone) if t2 > t1 and s2 > s1 else alone
    return Link(bandwidth=bandwidth, rtt=rtt)


def best_of(history: list[Link]) -> Link:
    """A link's figure from its recent measurements: the highest bandwidth and lowest RTT.
    Cross traffic (another peer's probe into the same peer, someone's download) only
    ever slows a measurement, so the best recent one is the link's capacity; a link
    that really got slower shows once the older measurements age out."""
    return Link(bandwidth=max(l.bandwidth for l in history), rtt=min(l.rtt for l in history))


def _steady(times: list[float]) -> list[float]:
    return times[1:] if len(times) > 1 else times
