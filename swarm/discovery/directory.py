"""Who is in the swarm right now: mDNS records and unicast seeds, kept honest by heartbeats.

A peer is *live* once it has answered a PING and stays live until it misses
LivenessConfig.misses heartbeats in a row, sends an mDNS goodbye, or answers a PING
saying it is leaving (a graceful `swarm join` exit); mDNS alone would keep a killed
peer for about 19 minutes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from zeroconf import InterfaceChoice

from swarm.aio import wait_event
from swarm.discovery.liveness import Liveness, LivenessConfig
from swarm.discovery.mdns import Mdns, PeerRecord
from swarm.discovery.txt import SERVICE_TYPE as SERVICE, TxtError, decode, swarm_key
from swarm.runtime import sockets
from swarm.runtime.client import PeerClient, PeerError
from swarm.runtime.wire import Kind

log = logging.getLogger(__name__)

SEED_REFRESH_S = 5.0  # between INFO requests to seeds (and the peers they told us of)
INFO_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class DirectoryConfig:
    interfaces: list[str] | InterfaceChoice  # explicit, always (see swarm.discovery.mdns)
    seeds: tuple[str, ...] = ()  # "host:port" of peers' shard servers, for networks without multicast
    mdns: bool = True  # False: seeds only (a network that blocks multicast, or to test one)
    fingerprint: str | None = None  # accept only peers serving this model (short fingerprint)
    liveness: LivenessConfig = field(default_factory=LivenessConfig)
    seed_refresh_s: float = SEED_REFRESH_S


class Directory:
    """Live peers by peer id. ``async with Directory(...) as d`` opens mDNS; run ``d.run()``
    in the owner's TaskGroup. ``wait_change(version)`` wakes every waiter on a change."""

    def __init__(self, config: DirectoryConfig, own_id: str | None = None) -> None:
        self.config = config
        self.own_id = own_id
        self.live: dict[str, PeerRecord] = {}
        self.version = 0
        self.mdns = Mdns(config.interfaces)
        self._seeded: dict[str, PeerRecord] = {}  # peer id -> record learned over INFO
        self._seeded_at: dict[str, float] = {}
        self._liveness = Liveness(config.liveness)
        self._clients: dict[str, PeerClient] = {}
        self._ctx = None
        self._changed = asyncio.Event()
        self.seed_errors: dict[str, str] = {}
        self.closed = False

    async def __aenter__(self) -> Directory:
        self._ctx = sockets.new_context()
        if self.config.mdns:
            await self.mdns.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._bump()  # whoever waits for a change hears that none will come
        await self.mdns.close()
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.aclose()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def client(self, host: str, port: int) -> PeerClient:
        """A connected client for a peer's shard server, shared by heartbeats and probes."""
        if self._ctx is None:
            raise PeerError("the directory is closed")
        address = f"tcp://{host}:{port}"
        if address not in self._clients:
            self._clients[address] = PeerClient(address, ctx=self._ctx,
                                                on_disconnect=lambda: self._connection_closed(host, port)).start()
        return self._clients[address]

    def _connection_closed(self, host: str, port: int) -> None:
        """A live peer's connection closed (killed, or its process ended): dropped now, not
        after missed heartbeats. One that is in fact alive answers the next heartbeat and
        is live again."""
        gone = [pid for pid, rec in self.live.items() if (rec.host, rec.port) == (host, port)]
        for pid in gone:
            log.info("peer %s (%s) closed its connection: dropped", self.live[pid].announcement.name, pid)
            del self.live[pid]
            self._liveness.forget(pid)
        if gone:
            self._bump()

    async def _close_client(self, host: str, port: int) -> None:
        client = self._clients.pop(f"tcp://{host}:{port}", None)
        if client is not None:
            await client.aclose()

    async def run(self) -> None:
        """Resolve mDNS, poll seeds and send heartbeats until cancelled."""
        async with asyncio.TaskGroup() as tg:
            if self.config.mdns:
                tg.create_task(self.mdns.run())
            tg.create_task(self._heartbeats())
            if self.config.seeds:
                tg.create_task(self._seed_loop())

    async def wait_change(self, version: int, timeout: float) -> int:
        """Wait until the live set or an announcement in it changes past `version`, the
        directory closes, or timeout."""
        if self.version == version and not self.closed:
            await wait_event(self._changed, timeout)
        return self.version

    async def wait_for(self, predicate, timeout: float) -> bool:
        """Wait until predicate(live) holds; False on timeout or when the directory closes."""
        deadline = time.monotonic() + timeout
        version = self.version
        while not predicate(self.live):
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                return False
            version = await self.wait_change(version, left)
        return True

    def _bump(self) -> None:
        # A fresh event per version: every waiter of the old one wakes, none misses a bump.
        self.version += 1
        old, self._changed = self._changed, asyncio.Event()
        old.set()

    def candidates(self) -> dict[str, PeerRecord]:
        """Every peer heard of (mDNS or seeds) serving our model, one per peer id (its
        latest announcement) and one per address (the most recently heard: a peer
        restarted on the same port has a new id, and the old record must not live on)."""
        heard: list[tuple[PeerRecord, float]] = [(r, self._seeded_at.get(pid, 0.0)) for pid, r in self._seeded.items()]
        heard += [(r, self.mdns.heard_at.get(name, 0.0)) for name, r in self.mdns.records.items()]
        usable = []
        for rec, at in heard:
            a = rec.announcement
            if a.peer_id == self.own_id:
                continue
            if self.config.fingerprint and a.fingerprint != self.config.fingerprint and not a.open:
                self.mdns.heard.rejected[rec.service_name or a.peer_id] = f"model {a.fingerprint}, not ours"
                continue
            usable.append((rec, at))
        return freshest(usable)

    async def _heartbeats(self) -> None:
        interval = self.config.liveness.interval_s
        while True:
            candidates = self.candidates()
            answers = await asyncio.gather(*(self._ping(r) for r in candidates.values()))
            changed = False
            for (pid, rec), status in zip(candidates.items(), answers):
                if status is not None and status.get("leaving"):
                    self._liveness.forget(pid)
                    if self.live.pop(pid, None) is not None:
                        log.info("peer %s (%s) is leaving: dropped", rec.announcement.name, pid)
                        changed = True
                elif status is not None:
                    self._liveness.answered(pid)
                    if self.live.get(pid) != rec:
                        self.live[pid], changed = rec, True
                elif self._liveness.missed(pid):
                    if pid in self.live:
                        log.info("peer %s (%s) missed %d heartbeats: dropped", rec.announcement.name, pid,
                                 self.config.liveness.misses)
                        del self.live[pid]
                        changed = True
                    # A dead peer's socket queues every unanswered ping (up to the high-water
                    # mark, where sends block): start from a fresh socket next time.
                    await self._close_client(rec.host, rec.port)
            for pid in set(self.live) - set(candidates):  # mDNS goodbye
                rec = self.live.pop(pid)
                self._liveness.forget(pid)
                await self._close_client(rec.host, rec.port)
                changed = True
            if changed:
                self._bump()
            # A new or changed record is pinged at once; otherwise once per interval.
            self.mdns.changed.clear()
            await wait_event(self.mdns.changed, interval)

    async def _ping(self, rec: PeerRecord) -> dict | None:
        """The peer's status, or None when it did not answer in time."""
        timeout = self.config.liveness.timeout_s
        try:
            client = self.client(rec.host, rec.port)
            return await client.ping(timeout=timeout)  # the bound covers the send too
        except (PeerError, TimeoutError):
            return None

    async def _seed_loop(self) -> None:
        while True:
            addresses = {_split(s) for s in self.config.seeds}
            addresses |= {(r.host, r.port) for r in self._seeded.values()}
            for host, port in sorted(addresses):
                await self._ask_seed(host, port)
            self.mdns.changed.set()
            await asyncio.sleep(self.config.seed_refresh_s)

    async def _ask_seed(self, host: str, port: int) -> None:
        key = f"{host}:{port}"
        try:
            client = self.client(host, port)
            info = (await client.request(Kind.INFO, timeout=INFO_TIMEOUT_S)).get("info") or {}
            a = decode(info["announcement"], swarm_key())
        except (PeerError, TxtError, KeyError, TypeError) as e:
            self.seed_errors[key] = str(e)
            await self._close_client(host, port)  # no queue of unanswered requests builds up
            return
        self.seed_errors.pop(key, None)
        for pid, rec in list(self._seeded.items()):  # whoever served here before is gone
            if (rec.host, rec.port) == (host, port) and pid != a.peer_id:
                del self._seeded[pid], self._seeded_at[pid]
        self._seeded[a.peer_id] = PeerRecord(a, host, port, "")
        self._seeded_at[a.peer_id] = time.monotonic()
        for other in info.get("peers", []):  # gossip one hop: the seed's live peers
            try:
                oid, ohost, oport = other["id"], str(other["host"]), int(other["port"])
            except (KeyError, TypeError, ValueError):
                continue
            if oid != self.own_id and oid not in self._seeded:
                await self._ask_seed(ohost, oport)

    def diagnostic(self) -> str:
        """Why nobody usable was found: interfaces tried, what was heard, seed errors."""
        interfaces = self.config.interfaces
        tried = ", ".join(interfaces) if isinstance(interfaces, list) else f"{interfaces.name} (all interfaces)"
        lines = [f"no live peers found; mDNS on {tried} for {SERVICE}" if self.config.mdns else
                 "no live peers found; mDNS off, seeds only"]
        heard = sorted(self.mdns.heard.names)
        lines.append(f"heard {len(heard)} service(s)" + (": " + ", ".join(heard) if heard else
                     " (multicast may be blocked: Wi-Fi client isolation, VLANs, a firewall on UDP 5353;"
                     " try --peer HOST:PORT)"))
        if summary := self.mdns.heard.summary():
            lines.append(summary)
        for name, why in sorted(self.mdns.heard.rejected.items()):
            lines.append(f"  ignored {name}: {why}")
        for seed, err in sorted(self.seed_errors.items()):
            lines.append(f"  seed {seed}: {err}")
        silent = set(self.candidates()) - set(self.live)
        for pid in sorted(silent):
            lines.append(f"  heard of {pid} but it does not answer heartbeats (firewall on its port?)")
        return "\n".join(lines)





def _split(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host, int(port)


def freshest(heard: list[tuple[PeerRecord, float]]) -> dict[str, PeerRecord]:
    """peer id -> record: per id the highest seq (then the latest heard), then per
    address only the most recently heard id."""
    by_id: dict[str, tuple[PeerRecord, float]] = {}
    for rec, at in heard:
        old = by_id.get(rec.announcement.peer_id)
        if old is None or (rec.announcement.seq, at) >= (old[0].announcement.seq, old[1]):
            by_id[rec.announcement.peer_id] = (rec, at)
    by_address: dict[tuple[str, int], tuple[PeerRecord, float]] = {}
    for rec, at in by_id.values():
        old = by_address.get((rec.host, rec.port))
        if old is None or at > old[1]:
            by_address[(rec.host, rec.port)] = (rec, at)
    return {rec.announcement.peer_id: rec for rec, _ in by_address.values()}
