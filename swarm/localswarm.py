"""The swarm on this machine alone.

- ``LocalSwarm``: N `swarm join` processes on 127.0.0.1, each with a memory budget small
  enough that the planner must split the model across them; stopped on exit, and
  killed by the kernel if this process dies first (no peer is ever left behind).
- ``local_peers``: N bare shard servers (`swarm serve-shard`: no discovery) for a plan
  written by hand (tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import math
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from swarm.secret import ENV_VARIABLE


log = logging.getLogger(__name__)


# ---------------------------------------------------------------- N peers on loopback

PEER_START_TIMEOUT_S = 600.0  # a first start profiles the device for the model
PEER_STOP_TIMEOUT_S = 10.0  # SIGHUP (mDNS goodbye), then SIGKILL
# Linux's SIGHUP (the signal module is the CLI's, see tests/test_layering.py): `swarm join`
# leaves at once on it, without waiting for a source to move its stages.
LEAVE_AT_ONCE = 1
FREEZE = 19  # Linux's SIGSTOP: the process stops, its sockets stay open
LOG_TAIL_LINES = 15
EXIT_TIMEOUT_S = 10.0  # a bare shard server's exit once its stdin closes


class LocalSwarmError(RuntimeError):
    """A local peer did not start; the message carries the end of its log."""


@dataclass(frozen=True)
class Budgets:
    """Usable memory for the source (this process) and for each local peer, in bytes."""

    source: int
    peer: int


def local_budgets(unit_mem: Sequence[int], peers: int) -> Budgets:
    """Budgets that make the planner split the model across ``peers`` local peers.

    The source gets room for the embedding only (raw tokens never leave it); each
    peer gets an even share of the rest plus one block of slack, so that with two or
    more peers none can hold everything and the plan must cut the model. With three
    or more, the share is of one peer fewer: any N - 1 of them still hold the model,
    so losing one mid-answer is recovered from (the swarm re-plans without it).
    ``unit_mem``: bytes each unit needs (weights + KV cache), in unit order.
    """
    if peers < 1:
        raise ValueError("a local swarm needs at least one peer")
    rest = list(unit_mem[1:])
    slack = max(rest[:-1] or rest)  # one decoder block
    source = math.ceil(unit_mem[0] * 1.01) + 1
    spare = 1 if peers >= 3 else 0
    peer = max(max(rest), math.ceil(sum(rest) / (peers - spare))) + slack
    return Budgets(source, peer)


def unit_memory(model_dir: Path, slots: int, max_len: int, dtype: str = "float32",
                quant: str | None = None) -> list[int]:
    """Bytes per unit as the planner counts them: weights + a KV cache of slots x max_len."""
    from swarm.model.units import ModelLayout

    layout = ModelLayout.read(model_dir)
    kv_tokens = slots * max_len
    return [w + kv * kv_tokens
            for w, kv in zip(layout.unit_weight_bytes(dtype, quant), layout.kv_bytes_per_token(dtype))]


@dataclass(frozen=True)
class LocalSwarmConfig:
    peers: int
    mem_bytes: int  # usable memory each peer announces
    model: Path | None = None
    threads: int = 1
    interface: str = "127.0.0.1"
    log_dir: Path | None = None  # each peer's stderr goes to peer-<i>.log here; None: discarded
    extra_args: tuple[str, ...] = ()  # more `swarm join` options (tests shorten heartbeats)
    quant: str | None = None  # every peer joins with this --quant
    # No multicast: the peers find each other (and the source finds them) through
    # --peer seeds only, so a local swarm never mixes with other swarms on the machine.
    isolated: bool = True
    start_timeout_s: float = PEER_START_TIMEOUT_S
    stop_timeout_s: float = PEER_STOP_TIMEOUT_S


@dataclass(frozen=True)
class LocalPeer:
    name: str
    pid: int
    peer_id: str
    address: str


def free_ports(count: int, host: str) -> list[int]:
    """Ports free right now (all held open together, so they are distinct)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]


def _die_with_parent() -> None:
    """In the child before exec: SIGHUP when the parent dies, even by SIGKILL (Linux)."""
    try:
        # PR_SET_PDEATHSIG (1) with SIGHUP (1): the peer says goodbye and exits at once (its
        # source, this process, is gone: no one is left to move its stages away).
        ctypes.CDLL(None, use_errno=True).prctl(1, LEAVE_AT_ONCE)
    except (OSError, AttributeError):
        pass  # not Linux: close() still stops them on every orderly exit


class LocalSwarm:
    """``async with LocalSwarm(config) as swarm``: N `swarm join` processes on loopback.

    Each peer runs in its own session, so Ctrl-C in the terminal reaches only the
    chat; the peers stop when the block exits (or when this process dies).
    """

    def __init__(self, config: LocalSwarmConfig, on_ready: Callable[[int, int, str], None] | None = None,
                 source_mem: int | None = None) -> None:
        self.config = config
        self.source_mem = source_mem  # what the source may hold (see local_budgets), if known
        self.peers: list[LocalPeer] = []
        self.ports = free_ports(config.peers, config.interface) if config.isolated else [0] * config.peers
        self._procs: list[asyncio.subprocess.Process] = []
        self._on_ready = on_ready or (lambda done, total, name: None)

    @classmethod
    def for_model(cls, model_dir: Path, peers: int, *, slots: int = 1, max_len: int = 512, threads: int = 1,
                  log_dir: Path | None = None, extra_args: Sequence[str] = (), quant: str | None = None,
                  on_ready: Callable[[int, int, str], None] | None = None) -> "LocalSwarm":
        """N peers whose budgets force a split of this model (``slots`` x ``max_len`` KV per unit)."""
        budgets = local_budgets(unit_memory(model_dir, slots, max_len, quant=quant), peers)
        config = LocalSwarmConfig(peers, budgets.peer, model_dir, threads, log_dir=log_dir, extra_args=tuple(extra_args),
                                  quant=quant)
        return cls(config, on_ready, source_mem=budgets.source)

    def source_settings(self) -> dict:
        """SourceConfig fields for a source that plans over exactly these peers:
        ``SourceConfig(model=..., max_len=..., **local.source_settings())``."""
        return {"interfaces": [self.config.interface], "seeds": self.seeds, "mdns": not self.config.isolated,
                "mem_bytes": self.source_mem, "min_peers": self.config.peers}

    def command(self, index: int) -> list[str]:
        c = self.config
        cmd = [sys.executable, "-m", "swarm", "join", "--interface", c.interface, "--name", f"local-{index + 1}",
               "--mem", str(c.mem_bytes), "--threads", str(c.threads)]
        if c.model is not None:
            cmd += ["--model", str(c.model)]
        if c.quant:
            cmd += ["--quant", c.quant]
        if c.isolated:
            # The data port is any free one (the source learns it by PING): the default,
            # --port + 1, may be taken, and two peers' ports may even be adjacent.
            cmd += ["--no-mdns", "--port", str(self.ports[index]), "--data-port", "0"]
            for other, port in enumerate(self.ports):
                if other != index:
                    cmd += ["--peer", f"{c.interface}:{port}"]
        return cmd + list(c.extra_args)

    @property
    def seeds(self) -> tuple[str, ...]:
        """host:port of every peer, for a source that finds them without multicast."""
        return tuple(p.address.removeprefix("tcp://") for p in self.peers)

    def log_path(self, index: int) -> Path | None:
        return None if self.config.log_dir is None else self.config.log_dir / f"peer-{index + 1}.log"

    async def __aenter__(self) -> "LocalSwarm":
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _start(self) -> None:
        if self.config.log_dir is not None:
            self.config.log_dir.mkdir(parents=True, exist_ok=True)
        for i in range(self.config.peers):
            path = self.log_path(i)
            with open(path, "wb") if path else contextlib.nullcontext(asyncio.subprocess.DEVNULL) as err:
                self._procs.append(await asyncio.create_subprocess_exec(
                    *self.command(i), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=err,
                    start_new_session=True, preexec_fn=_die_with_parent))
        try:
            async with asyncio.timeout(self.config.start_timeout_s):
                async with asyncio.TaskGroup() as tasks:
                    waits = [tasks.create_task(self._joined(i, proc)) for i, proc in enumerate(self._procs)]
        except* LocalSwarmError as failed:  # the first peer that failed says why, not a task group
            raise failed.exceptions[0] from None
        self.peers = [w.result() for w in waits]

    def kill(self, index: int) -> None:
        """SIGKILL peer ``index`` (a device that vanishes without a word: benchmarks of recovery);
        nothing if it has already ended."""
        with contextlib.suppress(ProcessLookupError):
            self._procs[index].kill()

    def freeze(self, index: int) -> None:
        """SIGSTOP peer ``index`` (a frozen device or a lost link: its connections stay open and only
        missed heartbeats tell). ``kill`` ends it as it is."""
        self._procs[index].send_signal(FREEZE)

    async def restart(self, index: int) -> LocalPeer:
        """Start peer ``index`` again (on its port) after it died or was killed; a new member
        of the swarm (a new peer id)."""
        old = self._procs[index]
        if old.returncode is None:
            await old.wait()
        path = self.log_path(index)
        with open(path, "ab") if path else contextlib.nullcontext(asyncio.subprocess.DEVNULL) as err:
            self._procs[index] = await asyncio.create_subprocess_exec(
                *self.command(index), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=err,
                start_new_session=True, preexec_fn=_die_with_parent)
        peers = list(self.peers)
        async with asyncio.timeout(self.config.start_timeout_s):
            peer = await self._joined(index, self._procs[index])
        peers[index] = peer  # in index order, as after the start
        self.peers = peers
        return peer

    async def _joined(self, index: int, proc: asyncio.subprocess.Process) -> LocalPeer:
        """The peer's `joined` line, printed once it serves and announces."""
        while line := await proc.stdout.readline():
            try:
                said = json.loads(line)
            except ValueError:
                continue
            if isinstance(said, dict) and "joined" in said:
                peer = LocalPeer(said.get("name", f"local-{index + 1}"), proc.pid, said["joined"], said["address"])
                self.peers.append(peer)
                self._on_ready(len(self.peers), self.config.peers, peer.name)
                return peer
        await proc.wait()
        raise LocalSwarmError(f"local peer {index + 1} exited with status {proc.returncode} before joining"
                              + self._log_tail(index))

    def _log_tail(self, index: int) -> str:
        path = self.log_path(index)
        if path is None or not path.exists():
            return ""
        lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        return f"; end of {path}:\n" + "\n".join(lines)

    async def close(self) -> None:
        """Stop every peer (SIGHUP: leave at once, then SIGKILL after stop_timeout_s); safe to call twice.

        Not SIGTERM: that asks a peer to wait until its source moves its stages away, and
        here the whole swarm is going."""
        procs, self._procs = self._procs, []
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(LEAVE_AT_ONCE)
        for proc in procs:
            try:
                async with asyncio.timeout(self.config.stop_timeout_s):
                    await proc.wait()
            except TimeoutError:
                log.warning("local peer %d did not stop in %.0f s; killing it", proc.pid, self.config.stop_timeout_s)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


# ---------------------------------------------------------------- bare shard servers

@contextlib.contextmanager
def local_peers(count: int, threads: int = 1, info: dict | None = None, args: Sequence[str] = (),
                secret: str | None = None, env: dict[str, str] | None = None) -> Iterator[list[str]]:
    """Start ``count`` bare shard servers (`swarm serve-shard`: no discovery) on 127.0.0.1;
    yields their control addresses; stops them on exit (and they stop when this process does).

    They join this process's swarm (SWARM_SECRET, inherited), or the one whose join code is
    ``secret``; ``args`` are more peer options (``--insecure``, limits, ``--no-local-paths``);
    ``env``, more environment variables (``SWARM_CACHE_DIR``: a cache of their own)."""
    env = {**os.environ, **(env or {}), **({} if secret is None else {ENV_VARIABLE: secret})}
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "swarm", "serve-shard", "--port", "0", "--threads", str(threads),
                 "--exit-on-eof", "--info", json.dumps(info or {}), *args],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            ))
        addresses = []
        for proc in procs:
            line = proc.stdout.readline().strip()
            if not line.startswith("tcp://"):
                raise RuntimeError(f"peer process {proc.pid} did not start (exit code {proc.poll()})")
            addresses.append(line)
        yield addresses
    finally:
        for proc in procs:
            proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
