"""Link measurement to live peers over ZeroMQ PROBE requests, refreshed periodically
and whenever the live set changes. One link at a time, a few hundred kilobytes per
link per interval, so a running generation does not notice."""

from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable

from swarm.discovery.directory import Directory
from swarm.discovery.links import ProbeConfig, link_from_timings, probe_sizes
from swarm.discovery.txt import Link
from swarm.runtime.client import PeerClient, PeerError

log = logging.getLogger(__name__)


async def measure_link(client: PeerClient, activation_bytes: int, config: ProbeConfig) -> Link:
    """RTT from empty probes, bandwidth from the slope between two payload sizes."""
    rtts = [await client.probe(timeout=config.timeout_s) for _ in range(config.ping_rounds)]
    small, large = probe_sizes(activation_bytes, config)
    t_small, t_large = [], []
    for _ in range(config.rounds):
        t_small.append(await client.probe(send_bytes=small, timeout=config.timeout_s))
        t_large.append(await client.probe(send_bytes=large, timeout=config.timeout_s))
    return link_from_timings(rtts, (small, t_small), (large, t_large))


class LinkProber:
    """links[peer id] -> what this process measured towards that peer."""

    def __init__(self, directory: Directory, activation_bytes: int, config: ProbeConfig,
                 on_update: Callable[[], Awaitable[None]] | None = None) -> None:
        self.directory = directory
        self.activation_bytes = activation_bytes
        self.config = config
        self.links: dict[str, Link] = {}
        self._measured_at: dict[str, float] = {}
        self._on_update = on_update
        self.rounds = 0  # completed passes, for callers waiting on fresh figures

    def due(self, now: float) -> list[str]:
        """Live peers never measured or measured longer than an interval ago."""
        return [pid for pid in sorted(self.directory.live)
                if now - self._measured_at.get(pid, -float("inf")) >= self.config.interval_s]

    async def run(self) -> None:
        version = self.directory.version
        while True:
            changed = False
            for pid in set(self.links) - set(self.directory.live):
                del self.links[pid], self._measured_at[pid]
                changed = True
            for pid in self.due(time.monotonic()):
                rec = self.directory.live.get(pid)
                if rec is None:
                    continue
                try:
                    client = await self.directory.client(rec.host, rec.port)
                    link = await measure_link(client, self.activation_bytes, self.config)
                except PeerError as e:
                    log.info("probe to %s failed: %s", pid, e)
                    continue
                log.info("link to %s: %.2f MB/s, rtt %.2f ms", rec.announcement.name, link.bandwidth / 1e6,
                         link.rtt * 1e3)
                self.links[pid], self._measured_at[pid] = link, time.monotonic()
                changed = True
            self.rounds += 1
            if changed and self._on_update is not None:
                await self._on_update()
            soonest = min([self._measured_at[p] + self.config.interval_s for p in self._measured_at],
                          default=time.monotonic() + self.config.interval_s)
            version = await self.directory.wait_change(version, max(0.05, soonest - time.monotonic()))
