"""Link measurement to live peers over ZeroMQ PROBE requests, refreshed periodically
and whenever the live set changes. One link at a time, under a megabyte per link per
interval; while this process is serving a generation, refreshes of links already
measured wait (up to ProbeConfig.max_defer intervals), so probes do not compete
with activations. A new peer is always measured at once."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections import deque
from typing import Awaitable, Callable, Iterator

from swarm.discovery.directory import Directory
from swarm.discovery.links import ProbeConfig, best_of, link_from_timings, probe_sizes
from swarm.discovery.txt import Link
from swarm.runtime.client import PeerClient, PeerError

log = logging.getLogger(__name__)


async def measure_link(client: PeerClient, activation_bytes: int, config: ProbeConfig, down: bool = False,
                       known: Link | None = None) -> Link:
    """RTT from empty probes, bandwidth from the slope between two payload sizes: sent to
    the peer (up), or with down=True asked back from it (the link from the peer to us).
    ``known``: the link's last figure, which keeps a refresh's payloads light on a slow link."""
    rtts = [await client.probe(timeout=config.timeout_s) for _ in range(config.ping_rounds)]
    small, large = probe_sizes(activation_bytes, config, known.bandwidth if known is not None else 0.0)
    t_small, t_large = [], []
    for _ in range(config.rounds):
        for size, times in ((small, t_small), (large, t_large)):
            payload = {"reply_bytes": size} if down else {"send_bytes": size}
            times.append(await client.probe(**payload, timeout=config.timeout_s))
    return link_from_timings(rtts, (small, t_small), (large, t_large))


class LinkProber:
    """links[peer id] -> what this process measured towards that peer; with both_ways
    (a source nobody else probes) also links_back[peer id], from that peer to us."""

    def __init__(self, directory: Directory, activation_bytes: int, config: ProbeConfig,
                 on_update: Callable[[], Awaitable[None]] | None = None, both_ways: bool = False,
                 busy: Callable[[], bool] | None = None) -> None:
        self.directory = directory
        self.activation_bytes = activation_bytes
        self.config = config
        self.links: dict[str, Link] = {}
        self.links_back: dict[str, Link] = {}
        self.both_ways = both_ways
        self._history: dict[tuple[str, bool], deque[Link]] = {}  # (peer id, down) -> recent measurements
        self._due_at: dict[str, float] = {}
        self._deferred: dict[str, int] = {}
        self._busy = busy or (lambda: False)
        self._paused = 0  # paused() blocks held: refreshes wait, as while busy, without a bound
        self.measurements = 0  # completed link measurements (one per peer per refresh)
        self._on_update = on_update
        self._random = random.Random()

    def due(self, now: float) -> list[str]:
        """Live peers never measured, or whose (jittered) interval has passed."""
        return [pid for pid in sorted(self.directory.live) if self._due_at.get(pid, -float("inf")) <= now]

    async def run(self) -> None:
        version = self.directory.version
        while True:
            changed = self._forget_gone()
            for pid in self.due(time.monotonic()):
                if self._defer(pid):
                    continue
                changed |= await self._measure(pid)
            if changed and self._on_update is not None:
                await self._on_update()
            soonest = min(self._due_at.values(), default=time.monotonic() + self.config.interval_s)
            version = await self.directory.wait_change(version, max(0.05, soonest - time.monotonic()))

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No refresh of a measured link inside this block (a new peer is still measured): for
        a tool that runs its own pipeline, which ``busy`` does not see (the testbed's source)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _defer(self, pid: str) -> bool:
        """Postpone refreshing a measured link while a generation runs, a bounded number of times
        (while paused, without a bound)."""
        if pid in self.links and self._paused:
            self._schedule(pid)
            return True
        if pid not in self.links or self._deferred.get(pid, 0) >= self.config.max_defer or not self._busy():
            self._deferred[pid] = 0
            return False
        self._deferred[pid] = self._deferred.get(pid, 0) + 1
        self._schedule(pid)
        return True

    def _schedule(self, pid: str) -> None:
        # Peers that meet probe each other all at once, so a link's first figure may be
        # low: measure it again soon; best_of keeps the better one.
        settling = not self._history.get((pid, False))  # scheduling the one after the first
        interval = min(self.config.settle_s, self.config.interval_s) if settling else self.config.interval_s
        spread = 1 + self.config.jitter * (2 * self._random.random() - 1)
        self._due_at[pid] = time.monotonic() + interval * spread

    def _forget_gone(self) -> bool:
        gone = set(self._due_at) - set(self.directory.live)
        for pid in gone:
            self.links.pop(pid, None)
            self.links_back.pop(pid, None)
            self._due_at.pop(pid)
            self._deferred.pop(pid, None)
            self._history.pop((pid, False), None)
            self._history.pop((pid, True), None)
        return bool(gone)

    async def _measure(self, pid: str) -> bool:
        rec = self.directory.live.get(pid)
        if rec is None:
            return False
        self._schedule(pid)
        try:
            client = self.directory.client(rec.host, rec.port)
            for down in (False, True) if self.both_ways else (False,):
                known = (self.links_back if down else self.links).get(pid)
                link = await measure_link(client, self.activation_bytes, self.config, down=down, known=known)
                history = self._history.setdefault((pid, down), deque(maxlen=self.config.history))
                history.append(link)
                (self.links_back if down else self.links)[pid] = best_of(list(history))
                log.info("link %s %s: %.2f MB/s, rtt %.2f ms (best of last %d: %.2f MB/s)",
                         "from" if down else "to", rec.announcement.name, link.bandwidth / 1e6, link.rtt * 1e3,
                         len(history), best_of(list(history)).bandwidth / 1e6)
        except PeerError as e:
            log.info("probe to %s failed: %s", pid, e)
            return False
        self.measurements += 1
        return True
