"""A swarm peer (`swarm join`): shard server + announcement + directory + link prober."""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field

from zeroconf import InterfaceChoice

from swarm.discovery.directory import Directory, DirectoryConfig
from swarm.discovery.links import ProbeConfig
from swarm.discovery.liveness import LivenessConfig
from swarm.discovery.prober import LinkProber
from swarm.discovery.txt import encode, from_profile, short_fingerprint, swarm_key
from swarm.runtime import sockets
from swarm.runtime.server import ServerConfig, ShardServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerConfig:
    name: str
    interfaces: list[str] | InterfaceChoice  # explicit, always
    port: int = 0  # shard server control port; 0 = any free port
    data_port: int = 0  # the port pipeline steps arrive on; 0 = any free port
    seeds: tuple[str, ...] = ()
    mdns: bool = True  # False: reachable through seeds only
    threads: int = 1
    mem_bytes: int | None = None  # usable memory to announce; None = the profile's
    model_dir: str | None = None  # this peer's own copy of the profiled model, loaded on LOAD
    quant: str | None = None  # int8 | int4: the weights it serves (the profile's fingerprint says so too)
    # Offers its memory for any model: announced so, it hears peers of every model, and a LOAD of
    # weights it does not hold fetches them from the LOAD's holder (``runtime.transfer``).
    open: bool = False
    # A LOAD's path that exists on this machine is read in place (ServerConfig); `swarm join`
    # turns it off unless --local-paths: a model it does not hold comes over the swarm.
    local_paths: bool = True
    # What a hop costs this peer (swarm.runtime.hopcost); None: measured on its data socket at start.
    hop_overhead_s: float | None = None
    liveness: LivenessConfig = field(default_factory=LivenessConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


def new_peer_id() -> str:
    """Fresh per process, so cloned machines never share an id."""
    return secrets.token_hex(6)


def bind_host(interfaces: list[str] | InterfaceChoice) -> str:
    return interfaces[0] if isinstance(interfaces, list) and len(interfaces) == 1 else "0.0.0.0"


def activation_bytes(profile: dict) -> int:
    """What a prefill step sends across the widest cut: the size link probes use."""
    per_token = max(u["out_bytes_per_token"] for u in profile["units"][:-1]) if len(profile["units"]) > 1 else 0
    return int(per_token * profile.get("prefill_tokens", 32))


def measure_profile(model_dir, threads: int, mem_limit: int | None = None, quant: str | None = None) -> dict:
    """This device's profile for the model as JSON (swarm.model.profile caches it)."""
    from swarm.model.profile import profile_device

    return profile_device(model_dir, threads=threads, mem_limit=mem_limit, quant=quant).to_json()


async def measure_own_hop_overhead(data_address: str) -> float:
    """What a hop costs this peer's torch thread (swarm.runtime.hopcost), 0 if it cannot be measured."""
    from swarm.runtime.hopcost import measure_hop_overhead

    try:
        overhead = await asyncio.to_thread(measure_hop_overhead, data_address)
    except (TimeoutError, RuntimeError, OSError) as exc:
        log.warning("could not measure this peer's hop overhead: %s", exc)
        return 0.0
    log.info("hop overhead %.3f ms (wake-up, decode, encode per step)", overhead * 1e3)
    return overhead


class SwarmPeer:
    """``async with SwarmPeer(config, profile) as peer: await peer.run()``."""

    def __init__(self, config: PeerConfig, profile: dict, peer_id: str | None = None) -> None:
        self.config = config
        self.profile = profile
        self.peer_id = peer_id or new_peer_id()
        self.seq = 0
        models = {profile["model"]["fingerprint"]: config.model_dir} if config.model_dir else {}
        self.server = ShardServer(ServerConfig(bind_host=bind_host(config.interfaces), port=config.port,
                                               data_port=config.data_port, threads=config.threads, info={"profile": profile},
                                               models=models, quant=config.quant, local_paths=config.local_paths))
        self.directory = Directory(DirectoryConfig(
            interfaces=config.interfaces, seeds=config.seeds, mdns=config.mdns, liveness=config.liveness,
            fingerprint=None if config.open else short_fingerprint(profile["model"]["fingerprint"])),
            own_id=self.peer_id)
        self._steps_seen = 0
        self.prober = LinkProber(self.directory, activation_bytes(profile), config.probe, self.republish,
                                 busy=self._served_steps_since_last_asked)
        self.hop_overhead_s = 0.0  # measured on this peer's own data socket once it is bound

    @property
    def port(self) -> int:
        return sockets.port_of(self.server.address)

    def announcement(self):
        return from_profile(self.profile, self.peer_id, self.config.name, self.config.mem_bytes,
                            links=self.prober.links, seq=self.seq, hop_overhead_s=self.hop_overhead_s,
                            open=self.config.open)

    async def __aenter__(self) -> SwarmPeer:
        await self.server.__aenter__()
        try:
            host = bind_host(self.config.interfaces)
            self.hop_overhead_s = self.config.hop_overhead_s
            if self.hop_overhead_s is None:  # before serving: no warm-up yet, nothing else computes
                self.hop_overhead_s = await measure_own_hop_overhead(
                    f"tcp://{'127.0.0.1' if host == '0.0.0.0' else host}:{self.server.data_port}")
            await self.directory.__aenter__()
            self._refresh_info()
            if self.config.mdns:
                await self.directory.mdns.register(self.announcement(), self.port)
        except BaseException:
            await self.aclose()
            raise
        log.info("peer %s (%s) serving on %s", self.config.name, self.peer_id, self.server.address)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.directory.close()
        await self.server.aclose()

    async def leave(self, timeout_s: float) -> bool:
        """Leave gracefully: withdraw the announcement (an mDNS goodbye), answer every PING
        with "leaving", and keep serving, at most ``timeout_s``, until the source has
        moved this peer's stages away (unloaded them). True when it did in time."""
        self.server.leaving = True  # before the goodbye: a ping racing it must not re-add us
        if self.config.mdns:
            await self.directory.mdns.withdraw()
        return await self.server.leave(timeout_s)

    async def run(self) -> None:
        """Serve, listen, heartbeat and probe until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.server.serve_forever())
            tg.create_task(self.directory.run())
            tg.create_task(self.prober.run())
            tg.create_task(self._follow_directory())

    async def republish(self) -> None:
        """New link figures or a new live set: bump seq and re-announce."""
        self.seq += 1
        self._refresh_info()
        if self.config.mdns and not self.server.leaving:  # a leaving peer's record is withdrawn
            await self.directory.mdns.update(self.announcement())

    def _refresh_info(self) -> None:
        key = swarm_key()
        self.server.publish_info({
            "profile": self.profile, "announcement": encode(self.announcement(), key),
            "peers": [{"id": pid, "host": r.host, "port": r.port, "txt": encode(r.announcement, key)}
                      for pid, r in sorted(self.directory.live.items())],
        })

    def _served_steps_since_last_asked(self) -> bool:
        """Whether this peer computed pipeline steps since the prober last asked."""
        steps = self.server.status()["steps"]
        busy, self._steps_seen = steps != self._steps_seen, steps
        return busy

    async def _follow_directory(self) -> None:
        version = self.directory.version
        while True:
            version = await self.directory.wait_change(version, 3600)
            self._refresh_info()
