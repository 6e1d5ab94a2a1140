"""Speculative decoding over 3 `swarm join` peers on loopback: prompt lookup and a draft
model (another random model: mostly wrong drafts) give the answers of decoding without
speculation, greedy and seeded; a stage's peer killed while verify steps are out is
re-planned around and the answers are still the plain ones, token for token."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal

import pytest

from swarm.discovery.links import ProbeConfig
from swarm.model.local import LocalChain, generate
from swarm.model.sampling import GREEDY, SamplingParams, row_sampling
from swarm.runtime.speculate import Speculation
from swarm.source import SourceConfig, SwarmSource
from tests.helpers.chaos import LIVENESS, PEERS, ChaosPeers, recoveries_naming

pytestmark = pytest.mark.slow

# The third prompt repeats itself: lookup drafts from its first step on (and is wrong); the
# tiny model answers the last one with 22, 22, 22, 22: lookup drafts right.
PROMPTS = [[1, 17, 42, 99, 7, 3, 12], [1, 5], [1, 30, 31, 32, 33, 30, 31, 32, 33, 30, 31], [5, 6, 7, 8, 9]]
NEW = 40


@pytest.fixture(scope="module")
def draft_model_dir(tmp_path_factory):
    from swarm.model import hf

    return hf.save_tiny_llama(tmp_path_factory.mktemp("tiny-draft"), seed=1)


@contextlib.asynccontextmanager
async def speculating_swarm(model_dir, draft_dir, log_dir):
    """3 peers and a source whose pipeline has the draft model (sessions choose their mode)."""
    max_len = max(map(len, PROMPTS)) + NEW
    peers = ChaosPeers(model_dir, log_dir, max_len)
    try:
        await asyncio.gather(*(peers.start(i) for i in range(PEERS)))
        config = SourceConfig(interfaces=["127.0.0.1"], model=model_dir, seeds=peers.seeds(), mdns=False,
                              mem_bytes=peers.local.source_mem, min_peers=PEERS, max_len=max_len,
                              micro_batches=2, batch_size=2, liveness=LIVENESS, probe=ProbeConfig(interval_s=60),
                              seed_refresh_s=0.3, step_timeout_s=5.0, speculate="model",
                              speculate_model=str(draft_dir))
        async with SwarmSource(config) as source:
            await source.deploy()
            yield source, peers
    finally:
        peers.stop_all()


async def answers(source: SwarmSource, sampling: SamplingParams, mode: Speculation, on_token=None) -> list[list[int]]:
    """Every prompt at once, each its own session (prompt i seeded by row_sampling)."""
    outs: list[list[int]] = [[] for _ in PROMPTS]

    async def one(row: int, sessions: list) -> None:
        async with await source.open_session(row_sampling(sampling, row), speculate=mode) as session:
            sessions.append(session)
            async for token in session.generate(PROMPTS[row], NEW):
                outs[row].append(token)
                if on_token is not None:
                    on_token(sessions)

    sessions: list = []
    async with asyncio.timeout(120):
        async with asyncio.TaskGroup() as tasks:
            for row in range(len(PROMPTS)):
                tasks.create_task(one(row, sessions))
    return outs


async def test_lookup_and_a_draft_model_give_the_plain_answers_over_three_peers(tiny_model_dir, draft_model_dir,
                                                                               tmp_path):
    chain = LocalChain.load(tiny_model_dir, [(0, 6)], max_slots=4, max_len=64)
    expected = generate(chain, PROMPTS, NEW)
    seeded = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=11)
    async with speculating_swarm(tiny_model_dir, draft_model_dir, tmp_path) as (source, _):
        assert len(source.current.stages) >= 3  # the source and at least two peers
        for mode in (Speculation.NGRAM, Speculation.MODEL):
            before = source.speculation.accepted, source.speculation.drafted
            assert await answers(source, GREEDY, mode) == expected, mode
            accepted, drafted = source.speculation.accepted - before[0], source.speculation.drafted - before[1]
            assert drafted > accepted and (accepted > 0 or mode is Speculation.MODEL), (mode, accepted, drafted)
        plain = await answers(source, seeded, Speculation.OFF)
        assert plain != await answers(source, SamplingParams(0.9, 20, 0.95, seed=12), Speculation.OFF)
        for mode in (Speculation.NGRAM, Speculation.MODEL):
            assert await answers(source, seeded, mode) == plain, mode


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=5)],
                         ids=["greedy", "seeded"])
async def test_a_stage_killed_mid_verification_replays_the_accepted_history(tiny_model_dir, draft_model_dir,
                                                                            tmp_path, sampling):
    rng = random.Random(23)
    async with speculating_swarm(tiny_model_dir, draft_model_dir, tmp_path) as (source, peers):
        plain = await answers(source, sampling, Speculation.OFF)
        before = len(source.state().recoveries)
        killed: list[int] = []

        def kill_while_verifying(sessions) -> None:
            # A token just landed; once some sequence has a verify step out, a stage's peer dies.
            if not killed and any(s.drafts for s in sessions):
                killed.append(peers.index_of(rng.choice([s.address for s in source.current.stages[1:]])))
                peers.signal(killed[0], signal.SIGKILL)

        outs = await answers(source, sampling, Speculation.NGRAM, kill_while_verifying)
        assert killed and outs == plain
        events = await recoveries_naming(source, before, f"local-{killed[0] + 1}")
        assert all(e.error is None for e in events), events
