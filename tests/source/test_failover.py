"""Chaos: a source and 3 `swarm join` peers on loopback; a stage's peer is killed, frozen or
stopped at a random token of a batch of 4 generations, and every answer still equals the
undisturbed one (the single-process path and transformers' `generate`), token for token. The
source speculates by default (prompt lookup: tokens come in bursts), so the token is chosen
early enough that passes of the answer remain after it (``LAST_LOSS_AT``).

Each round: 4 prompts of different lengths, 64 greedy tokens each, 2 micro-batches of 2
in flight; at a random token of the first stream one peer holding a stage gets SIGKILL
(or SIGSTOP, or SIGTERM); the source notices within its heartbeat bound, re-plans over the
two peers left, replays every sequence and the streams go on. The peer is restarted (or,
frozen, resumed: it comes back as a new member) before the next round. The peers are
shared with test_chaos_phases.py (conftest.py); each test has a source of its own. Losses in the other
phases (planning, LOAD, the handshake, prefill, a second loss) are tests/source/test_chaos_phases.py's.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal

import pytest

from swarm.model.sampling import GREEDY, SamplingParams, row_sampling
from swarm.source import SwarmSource
from tests.helpers.chaos import (LAST_LOSS_AT, NEW, PEERS, PROMPTS, ChaosPeers, bring_back, chaos_source,
                                 recoveries_naming)

pytestmark = pytest.mark.slow

# Rounds per kind of loss (each a random token of a batch; SWARM_CHAOS_ROUNDS=N for more kills).
ROUNDS = {signal.SIGKILL: int(os.environ.get("SWARM_CHAOS_ROUNDS", 5)), signal.SIGSTOP: 3, signal.SIGTERM: 3}


async def disturbed_round(source: SwarmSource, peers: ChaosPeers, rng: random.Random, sig: int,
                          sampling: SamplingParams = GREEDY) -> tuple[list[list[int]], int]:
    """One batch; at a random token of the first stream a stage's peer gets ``sig``. Returns
    the answers and the index of the peer disturbed."""
    await source.deploy()  # plan over all three before the round (a peer that came back included)
    at = rng.randrange(1, LAST_LOSS_AT)  # passes of the answer remain after it (speculation on)
    outs: list[list[int]] = [[] for _ in PROMPTS]
    victim = -1

    async def stream(row: int) -> None:
        nonlocal victim
        async for token in source.generate(PROMPTS[row], NEW, row_sampling(sampling, row)):
            outs[row].append(token)
            if row == 0 and len(outs[0]) == at:
                # A peer of the plan running now (the one deploy() made may have been re-planned since).
                victim = peers.index_of(rng.choice([s.address for s in source.current.stages[1:]]))
                peers.signal(victim, sig)

    async with asyncio.timeout(120):
        async with asyncio.TaskGroup() as tasks:
            for row in range(len(PROMPTS)):
                tasks.create_task(stream(row))
    return outs, victim


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM], ids=["kill", "freeze", "leave"])
async def test_answers_survive_a_lost_peer_token_for_token(tiny_model_dir, peers, expected, sig):
    rng = random.Random(sig)
    async with chaos_source(tiny_model_dir, peers) as source:
        for round_ in range(ROUNDS[sig]):
            before = len(source.state().recoveries)
            outs, victim = await disturbed_round(source, peers, rng, sig)
            assert outs == expected, f"round {round_}: peer {victim} got {signal.Signals(sig).name}"
            # A peer leaving gracefully serves on until its stage is moved: the batch may end first.
            events = await recoveries_naming(source, before, f"local-{victim + 1}")
            assert all(e.error is None and e.peers >= 1 for e in events), events
            await bring_back(source, peers, victim, sig)


async def test_seeded_sampling_survives_a_lost_peer(tiny_model_dir, peers):
    sampling = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=11)
    async with chaos_source(tiny_model_dir, peers) as source:
        await source.deploy()
        undisturbed = await source.generate_all(PROMPTS, NEW, sampling)
        assert undisturbed != await source.generate_all(PROMPTS, NEW, SamplingParams(0.9, 20, 0.95, seed=12))
        outs, _ = await disturbed_round(source, peers, random.Random(3), signal.SIGKILL, sampling)
        assert outs == undisturbed
        assert source.state().recoveries[-1].error is None


async def test_too_little_memory_left_fails_at_once_naming_what_is_missing(tiny_model_dir, peers):
    async with chaos_source(tiny_model_dir, peers) as source:
        await source.deploy()
        session = await source.open_session()
        stages = [peers.index_of(s.address) for s in source.current.stages[1:]]
        tokens = session.generate(PROMPTS[0], NEW)
        await anext(tokens)
        others = [i for i in range(PEERS) if i not in stages]
        for index in others + stages[:-1]:  # one peer is left: it cannot hold the model alone
            peers.signal(index, signal.SIGKILL)
        from swarm.runtime.recovery import StageLost

        with pytest.raises(StageLost, match="missing"):
            async with asyncio.timeout(30):
                async for _ in tokens:
                    pass
        await session.aclose()
