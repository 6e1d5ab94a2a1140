"""Chaos in every phase of an answer: a stage's peer is killed while the source plans, while
its stage loads, during the data-plane handshake, in a prefill, in a decode step, a second
one during the recovery from the first, and at random times. Every answer equals the
undisturbed one token for token, or, when the peers left cannot hold the model, the
answer fails with an error that says so within the heartbeat bound.

The three `swarm join` peers are shared with test_failover.py (conftest.py: a killed one is
restarted after its test); each test has a source of its own. The kills are placed by wrapping the
source's own steps (its plan, its LOAD and PING requests, its first stage's compute):
the peers and the network are real.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time

import pytest

from swarm.runtime.client import PeerClient
from swarm.runtime.deploy import Deployment
from swarm.runtime.engine import Pipeline
from swarm.runtime.recovery import StageLost
from swarm.source import SwarmSource
from tests.helpers.chaos import LIVENESS, NEW, PASS_TOKENS, PEERS, PROMPTS, ChaosPeers, chaos_source

pytestmark = pytest.mark.slow

RANDOM_ROUNDS = 3
ERROR_WITHIN_S = LIVENESS.drop_bound_s + 10.0  # the bound, and a re-plan on a loaded 2-vCPU machine
REDEPLOY_WITHIN_S = LIVENESS.drop_bound_s + 5.0  # a LOAD of the tiny model is ~0.3 s
# The decode pass (the source's first-stage steps, counted) that a decode-phase loss follows. The
# source speculates by default: a pass may bring a row PASS_TOKENS tokens, so each of the 2
# micro-batches makes at least NEW // PASS_TOKENS passes; this one leaves passes after it.
DECODE_LOSS_AT = NEW // PASS_TOKENS


class Killer:
    """Kills one peer of a plan, once; remembers which."""

    def __init__(self, peers: ChaosPeers, rng: random.Random) -> None:
        self.peers, self.rng = peers, rng
        self.victims: list[int] = []
        self.plan = None  # the last plan the source made

    def kill_one_of(self, stages) -> None:
        alive = [s.address for s in stages[1:] if self.peers.index_of(s.address) not in self.victims]
        victim = self.peers.index_of(self.rng.choice(alive))
        self.peers.signal(victim, signal.SIGKILL)
        self.victims.append(victim)


def _wrap_plan(monkeypatch, killer: Killer, kill: bool) -> None:
    plan = SwarmSource.plan

    async def planned(source, *args, **kwargs):
        result = await plan(source, *args, **kwargs)
        killer.plan = result
        if kill and not killer.victims:  # planned over a peer that is gone before its LOAD
            killer.kill_one_of(result.stages)
        return result

    monkeypatch.setattr(SwarmSource, "plan", planned)


def _wrap_load(monkeypatch, killer: Killer) -> None:
    load = PeerClient.load

    async def loading(client, *args, **kwargs):
        if not killer.victims:  # this peer dies as its LOAD is sent
            victim = killer.peers.index_of(client.address)
            killer.peers.signal(victim, signal.SIGKILL)
            killer.victims.append(victim)
        return await load(client, *args, **kwargs)

    monkeypatch.setattr(PeerClient, "load", loading)


def _wrap_handshake(monkeypatch, killer: Killer) -> None:
    ping = PeerClient.ping

    async def handshake(client, *args, **kwargs):
        # The return connections on the stages' data sockets carry on_message: their first PING
        # is the handshake that lets the last stage route tokens home.
        if client._on_message is not None and not killer.victims:
            killer.kill_one_of(killer.plan.stages)
        return await ping(client, *args, **kwargs)

    monkeypatch.setattr(PeerClient, "ping", handshake)


def _wrap_compute(monkeypatch, killer: Killer, prefill: bool, at_call: int = 1) -> None:
    compute = Deployment._compute
    calls = [0]

    def computing(deployment, header, tokens):
        # A prefill feeds several tokens and verifies no drafts; a verify step (draws) decodes.
        prefilling = tokens.shape[1] > 1 and header["draws"] is None
        if not killer.victims and prefilling == prefill:
            calls[0] += 1
            if calls[0] == at_call:  # the step is computed here, then sent to a dead stage
                killer.kill_one_of(deployment.plan)
        return compute(deployment, header, tokens)

    monkeypatch.setattr(Deployment, "_compute", computing)


async def _answers(source: SwarmSource) -> list[list[int]]:
    async with asyncio.timeout(120):
        return await source.generate_all(PROMPTS, NEW)


@pytest.mark.parametrize("phase", ["planning", "load", "handshake", "prefill", "decode"])
async def test_a_peer_lost_in_any_phase_leaves_every_answer_exact(tiny_model_dir, peers, expected, monkeypatch,
                                                                 phase):
    killer = Killer(peers, random.Random(phase))
    _wrap_plan(monkeypatch, killer, kill=phase == "planning")
    if phase == "load":
        _wrap_load(monkeypatch, killer)
    elif phase == "handshake":
        _wrap_handshake(monkeypatch, killer)
    elif phase in ("prefill", "decode"):
        at_call = 1 if phase == "prefill" else DECODE_LOSS_AT
        _wrap_compute(monkeypatch, killer, prefill=phase == "prefill", at_call=at_call)
    async with chaos_source(tiny_model_dir, peers) as source:
        assert await _answers(source) == expected
        assert len(killer.victims) == 1, f"no peer was killed in the {phase} phase"
        lost = f"local-{killer.victims[0] + 1}"
        events = source.state().recoveries
        assert any(lost in e.lost for e in events) and all(e.error is None for e in events), events
        # Within the bound: nothing waits for a dead peer's reply (an OPEN in flight, say) to time out.
        assert all(e.redeploy_s <= REDEPLOY_WITHIN_S for e in events), events
        assert killer.victims[0] not in {peers.index_of(s.address) for s in source.current.stages[1:]}


async def test_a_second_loss_during_the_recovery_fails_within_the_bound_naming_what_is_missing(
        tiny_model_dir, peers, monkeypatch):
    """The first loss in a decode step; the second as the re-plan over the two left is switched
    to: one peer is left, and it cannot hold the model with the source."""
    killer = Killer(peers, random.Random(2))
    _wrap_compute(monkeypatch, killer, prefill=False, at_call=DECODE_LOSS_AT)
    switch = Pipeline.switch
    second_at: list[float] = []

    async def switching(pipeline, plan, lost):
        if len(killer.victims) == 1:
            killer.kill_one_of(plan)
            second_at.append(time.monotonic())
        return await switch(pipeline, plan, lost)

    monkeypatch.setattr(Pipeline, "switch", switching)
    async with chaos_source(tiny_model_dir, peers) as source:
        with pytest.raises(StageLost, match="missing") as raised:
            await _answers(source)
        failed_at = time.monotonic()
        assert len(killer.victims) == 2 and second_at, killer.victims
        assert failed_at - second_at[0] <= ERROR_WITHIN_S
        assert "memory" in str(raised.value)


async def test_a_peer_lost_at_a_random_time_leaves_every_answer_exact(tiny_model_dir, peers, expected):
    """Not at a token: a peer of the plan (or, before there is one, any peer) is killed at a
    random moment after the answers are asked for, which may fall in any phase."""
    rng = random.Random(7)
    for round_ in range(RANDOM_ROUNDS):
        async with chaos_source(tiny_model_dir, peers) as source:
            delay = rng.uniform(0.0, 1.5)

            async def kill_later() -> int:
                await asyncio.sleep(delay)
                plan = source.current
                choices = [peers.index_of(s.address) for s in plan.stages[1:]] if plan else list(range(PEERS))
                victim = rng.choice(choices)
                peers.signal(victim, signal.SIGKILL)
                return victim

            killing = asyncio.create_task(kill_later())
            try:
                outs = await _answers(source)
            finally:
                victim = await killing
            assert outs == expected, f"round {round_}: peer {victim} killed {delay:.2f} s in"
            assert all(e.error is None for e in source.state().recoveries)
        await peers.restart_dead()
