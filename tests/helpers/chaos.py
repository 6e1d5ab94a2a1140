"""A source and 3 `swarm join` peers on loopback for chaos tests: peers killed, frozen or
stopped, one at a time, and restarted on their own ports (seeds, no multicast)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess

from swarm.discovery.links import ProbeConfig
from swarm.discovery.liveness import LivenessConfig
from swarm.localswarm import LocalSwarm, LocalSwarmConfig, local_budgets, unit_memory
from swarm.model.local import LocalChain, generate
from swarm.runtime.speculate import MAX_DRAFT
from swarm.source import SourceConfig, SwarmSource
from tests.helpers.reference import reference_generate
from tests.helpers.shared import SHARED_PIDS

PROMPTS = [[1, 17, 42, 99, 7, 3, 12], [1, 5], [1, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40], [1, 9, 8, 7]]
NEW = 64
# Short, but not so short that a loaded 2-vCPU machine drops a healthy peer: drop bound 2.25 s.
LIVENESS = LivenessConfig(interval_s=0.25, timeout_s=0.5, misses=2)
PEERS = 3
MAX_LEN = max(map(len, PROMPTS)) + NEW
# Losses are placed by pass, not by token: the source speculates by default (prompt lookup), and
# a verify step brings up to MAX_DRAFT + 1 tokens of a row at once, so "at token 60" may fall in
# the answer's last pass and test no recovery. A loss at a token before LAST_LOSS_AT still has
# at least 4 passes of that answer after it, however many drafts each accepts.
PASS_TOKENS = MAX_DRAFT + 1  # the most tokens one pass delivers to a row
LAST_LOSS_AT = NEW - 4 * PASS_TOKENS
START_TIMEOUT_S = 120


def expected_answers(model_dir) -> list[list[int]]:
    """PROMPTS answered greedily by the single-process path, checked against transformers."""
    chain = LocalChain.load(model_dir, [(0, 6)], max_slots=4, max_len=128)
    want = generate(chain, PROMPTS, NEW)
    assert reference_generate(model_dir, PROMPTS, NEW) == want
    return want


class ChaosPeers:
    """3 `swarm join` processes on fixed loopback ports (seeds, no multicast), each one
    killable and restartable on its own port; any two can hold the model, one cannot."""

    def __init__(self, model_dir, log_dir, max_len: int, shared: bool = False) -> None:
        budgets = local_budgets(unit_memory(model_dir, 4, max_len), PEERS - 1)
        self.local = LocalSwarm(LocalSwarmConfig(PEERS, budgets.peer, model_dir, threads=1, log_dir=log_dir,
                                                 extra_args=("--heartbeat", str(LIVENESS.interval_s),
                                                             "--probe-interval", "60")),
                                source_mem=budgets.source)
        self.procs: list[subprocess.Popen | None] = [None] * PEERS
        self.frozen: set[int] = set()
        self.shared = shared  # by several tests (tests/source/conftest.py): the per-test leak check leaves them

    def seeds(self) -> tuple[str, ...]:
        return tuple(f"127.0.0.1:{port}" for port in self.local.ports)

    def index_of(self, address: str) -> int:
        return self.local.ports.index(int(address.rsplit(":", 1)[1]))

    async def start(self, index: int) -> None:
        path = self.local.log_path(index)
        with open(path, "ab") as log:
            proc = subprocess.Popen(self.local.command(index), stdout=subprocess.PIPE, stderr=log,
                                    stdin=subprocess.DEVNULL, start_new_session=True, text=True)
        self.procs[index] = proc
        if self.shared:
            SHARED_PIDS.add(proc.pid)
        line = await _readline(proc)
        assert "joined" in json.loads(line), f"peer {index} did not join: {line!r}"

    def signal(self, index: int, sig: int) -> None:
        os.kill(self.procs[index].pid, sig)
        if sig == signal.SIGSTOP:
            self.frozen.add(index)

    def resume(self, index: int) -> None:
        os.kill(self.procs[index].pid, signal.SIGCONT)
        self.frozen.discard(index)

    async def restart_dead(self) -> None:
        """Resume every frozen peer and start again every peer whose process has ended (between
        tests that share the peers)."""
        for index in list(self.frozen):
            self.resume(index)
        for index, proc in enumerate(self.procs):
            if proc is not None and proc.poll() is not None:
                self.reap(index)
                await self.start(index)

    def reap(self, index: int) -> None:
        proc = self.procs[index]
        proc.wait(10)
        proc.stdout.close()
        self.procs[index] = None

    def stop_all(self) -> None:
        for index, proc in enumerate(self.procs):
            if proc is None:
                continue
            if index in self.frozen:
                self.resume(index)
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            if proc is None:
                continue
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        self.procs = [None] * PEERS


async def _readline(proc: subprocess.Popen) -> str:
    async with asyncio.timeout(START_TIMEOUT_S):
        return await asyncio.to_thread(proc.stdout.readline)


@contextlib.asynccontextmanager
async def chaos_source(model_dir, peers: "ChaosPeers"):
    """A source over ``peers`` (already started; a test module may share them between tests)."""
    config = SourceConfig(interfaces=["127.0.0.1"], model=model_dir, seeds=peers.seeds(), mdns=False,
                          mem_bytes=peers.local.source_mem, min_peers=PEERS, max_len=MAX_LEN,
                          micro_batches=2, batch_size=2, liveness=LIVENESS, probe=ProbeConfig(interval_s=60),
                          seed_refresh_s=0.3, step_timeout_s=5.0)
    async with SwarmSource(config) as source:
        yield source


async def all_live(source: SwarmSource, count: int) -> None:
    async with asyncio.timeout(60):
        while len(source.state().announcements) < count:
            await asyncio.sleep(0.1)


async def recoveries_naming(source: SwarmSource, before: int, name: str) -> tuple:
    """The recoveries since ``before``, once one of them names ``name`` (bounded wait)."""
    async with asyncio.timeout(LIVENESS.drop_bound_s + 30):
        while not any(name in e.lost for e in source.state().recoveries[before:]):
            await asyncio.sleep(0.05)
    return source.state().recoveries[before:]


async def bring_back(source: SwarmSource, peers: ChaosPeers, victim: int, sig: int) -> None:
    if sig == signal.SIGSTOP:
        peers.resume(victim)  # the same process answers again: a new member of the swarm
    else:
        peers.reap(victim)
        await peers.start(victim)
    await all_live(source, PEERS)


