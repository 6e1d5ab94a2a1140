"""mDNS: announce this peer and listen for others on `_swarm._tcp.local.`.

zeroconf is always created with explicit interfaces. HOME_INTERFACES is the product
default for a home network (every interface of the machine); tests and every
command on shared machines pass ["127.0.0.1"] (or addresses inside network
namespaces they created).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field

import psutil
from zeroconf import InterfaceChoice, IPVersion, ServiceInfo, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from swarm.discovery.txt import (SERVICE_TYPE, Announcement, ForeignRecord, ReplayGuard, TxtError, decode, encode,
                                 swarm_key)

log = logging.getLogger(__name__)

# Product default on a home network: announce and listen on every interface.
HOME_INTERFACES = InterfaceChoice.All
RESOLVE_TIMEOUT_MS = 3000


@dataclass(frozen=True)
class PeerRecord:
    """An announcement heard on the network and where to reach the peer's shard server."""

    announcement: Announcement
    host: str
    port: int
    service_name: str = ""


@dataclass
class Heard:
    """What discovery saw, for the diagnostic when nobody usable was found."""

    names: set[str] = field(default_factory=set)  # every service name seen
    rejected: dict[str, str] = field(default_factory=dict)  # service name -> why it was ignored
    foreign: set[str] = field(default_factory=set)  # names whose records lacked this swarm's tag
    replayed: int = 0  # records older than one already accepted from the same peer

    def summary(self) -> str:
        """'heard 1 record from another swarm' and the like; '' when there is nothing to say."""
        parts = []
        if self.foreign:
            n = len(self.foreign)
            parts.append(f"heard {n} record{'s' if n != 1 else ''} from another swarm "
                         f"({', '.join(sorted(self.foreign))}): a device there needs this swarm's join code")
        if self.replayed:
            parts.append(f"ignored {self.replayed} replayed (older) record(s)")
        return "; ".join(parts)


def interface_addresses(interfaces: list[str] | InterfaceChoice) -> list[str]:
    """IPv4 addresses to put in our A records for the given interface choice."""
    if isinstance(interfaces, list):
        return list(interfaces)
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")]


class Mdns:
    """One AsyncZeroconf per process: our own registration plus a browser of others.

    Use as ``async with Mdns(interfaces) as m:`` and run ``m.run()`` in the owner's
    TaskGroup; it resolves what the browser hears. ``records`` maps service name to
    PeerRecord; ``changed`` is set on every change (the waiter clears it).
    """

    def __init__(self, interfaces: list[str] | InterfaceChoice) -> None:
        self.interfaces = interfaces
        self.records: dict[str, PeerRecord] = {}
        self.heard_at: dict[str, float] = {}  # service name -> when its record last resolved
        self.heard = Heard()
        self.changed = asyncio.Event()
        self._queue: asyncio.Queue[tuple[str, ServiceStateChange]] = asyncio.Queue()
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: ServiceInfo | None = None
        self._repeats: asyncio.Future | None = None  # zeroconf repeating our latest announcement
        self._own_name: str | None = None
        self._key = swarm_key()  # None: --insecure (untagged records, any record accepted)
        self._replays = ReplayGuard()

    async def __aenter__(self) -> Mdns:
        self._zc = AsyncZeroconf(interfaces=self.interfaces, ip_version=IPVersion.V4Only)
        # zeroconf calls handlers synchronously in the loop with these exact keyword names;
        # the handler only queues, and run() (owned by the caller's TaskGroup) does the work.
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        zc, self._zc = self._zc, None
        if zc is None:
            return
        if self._browser is not None:
            await self._browser.async_cancel()
        await self._withdraw(zc)
        await zc.async_close()

    async def withdraw(self) -> None:
        """Send the goodbye for this peer's record now (before leaving); browsing goes on."""
        if self._zc is not None:
            await self._withdraw(self._zc)

    async def _withdraw(self, zc: AsyncZeroconf) -> None:
        info, self._info = self._info, None
        self._stop_repeats()  # a repeat sent after the goodbye would bring the record back
        if info is not None:
            await (await zc.async_unregister_service(info))

    def _on_change(self, zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        self._queue.put_nowait((name, state_change))

    async def register(self, a: Announcement, port: int) -> None:
        """Announce this peer (its shard server listens on port)."""
        assert self._zc is not None
        self._own_name = f"{_label(a.name)}-{a.peer_id}.{SERVICE_TYPE}"
        self._info = self._service_info(a, port)
        # The name carries this process's random peer id, so no other responder holds it: probing
        # for a conflict first (RFC 6762, section 8.1; about 0.6 s) would find none.
        self._repeating(await self._zc.async_register_service(self._info, cooperating_responders=True))

    async def update(self, a: Announcement) -> None:
        """Re-announce with new TXT contents (links measured, memory limit changed)."""
        assert self._zc is not None and self._info is not None
        self._info = self._service_info(a, self._info.port)
        self._repeating(await self._zc.async_update_service(self._info))

    def _repeating(self, repeats: asyncio.Future) -> None:
        """zeroconf has sent the announcement and repeats it twice, 225 ms apart (RFC 6762,
        section 8.3), on its own; this peer goes on meanwhile rather than wait for the repeats."""
        self._stop_repeats()  # an older announcement's repeat would bring its old TXT back
        self._repeats = repeats

    def _stop_repeats(self) -> None:
        repeats, self._repeats = self._repeats, None
        if repeats is not None:
            repeats.cancel()

    def _service_info(self, a: Announcement, port: int) -> ServiceInfo:
        return ServiceInfo(
            SERVICE_TYPE, self._own_name, port=port, properties=encode(a, self._key),
            server=f"swarm-{a.peer_id}.local.",
            addresses=[socket.inet_aton(ip) for ip in interface_addresses(self.interfaces)],
        )

    async def run(self) -> None:
        """Resolve every service the browser hears; keep records current. Runs until cancelled."""
        while True:
            name, change = await self._queue.get()
            if name == self._own_name:
                continue
            self.heard.names.add(name)
            if change is ServiceStateChange.Removed:
                self.heard_at.pop(name, None)
                if self.records.pop(name, None) is not None:
                    self.changed.set()
                continue
            record = await self._resolve(name)
            if record is not None:
                self.heard_at[name] = time.monotonic()
            if record is not None and self.records.get(name) != record:
                self.records[name] = record
                self.changed.set()

    async def _resolve(self, name: str) -> PeerRecord | None:
        if self._zc is None:
            return None
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS):
            self.heard.rejected[name] = "did not resolve"
            return None
        try:
            a = decode(info.properties, self._key)
        except ForeignRecord as e:
            self.heard.foreign.add(name)
            self.heard.rejected[name] = str(e)
            return None
        except TxtError as e:
            self.heard.rejected[name] = str(e)
            return None
        if not self._replays.fresh(a):
            self.heard.replayed += 1
            log.info("ignored %s: sequence %d is older than one already heard", name, a.seq)
            return None
        self.heard.foreign.discard(name)
        hosts = info.parsed_addresses(IPVersion.V4Only)
        if not hosts:
            self.heard.rejected[name] = "no IPv4 address"
            return None
        self.heard.rejected.pop(name, None)
        return PeerRecord(a, hosts[0], int(info.port), name)


def _label(name: str) -> str:
    # The instance label is at most 63 bytes; leave room for "-<peer id>".
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40] or "peer"
