"""A conversation over a local swarm of two peers: same answers as one process, and the
second turn computes only its new tokens (the runtime's own count)."""

from __future__ import annotations

import pytest

from swarm.chat.conversation import Conversation
from swarm.localswarm import LocalSwarm, local_budgets, unit_memory
from swarm.model import hf
from swarm.model.profile import profile_device
from swarm.runtime.deploy import StagePlacement
from swarm.runtime.engine import Pipeline, PipelineConfig
from swarm.source import SourceConfig, SwarmSource
from swarm.view.from_source import snapshot_from_source

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "And of Italy?"]
MAX_LEN = 512


async def converse(open_session, tokenizer) -> tuple[Conversation, list[str]]:
    conversation = Conversation(open_session, tokenizer, max_new_tokens=16)
    answers = []
    for question in QUESTIONS:
        answers.append("".join([piece async for piece in conversation.ask(question)]))
    return conversation, answers


async def test_swarm_conversation_matches_one_process_and_reuses_the_cache(smollm2_dir, tmp_path):
    tokenizer = hf.load_tokenizer(smollm2_dir)
    async with Pipeline(PipelineConfig(smollm2_dir, (StagePlacement(None, 0, 32),), max_len=MAX_LEN)) as alone:
        local_conversation, expected = await converse(alone.open_session, tokenizer)
        local_turn = local_conversation.last_turn
        local_fed = local_conversation.session.fed_tokens
        await local_conversation.aclose()

    local = LocalSwarm.for_model(smollm2_dir, 2, max_len=MAX_LEN, log_dir=tmp_path, extra_args=("--heartbeat", "0.3"))
    async with local:
        assert local.source_settings() == {"interfaces": ["127.0.0.1"], "seeds": local.seeds, "mdns": False,
                                           "mem_bytes": local_budgets(unit_memory(smollm2_dir, 1, MAX_LEN), 2).source,
                                           "min_peers": 2}
        profile = profile_device(smollm2_dir, threads=1).to_json()
        # Speculation off, as the one-process run: drafts would count in fed_tokens.
        config = SourceConfig(model=smollm2_dir, name="me", profile=profile, max_len=MAX_LEN, speculate="off",
                              **local.source_settings())
        async with SwarmSource(config) as source:
            await source.deploy()
            conversation, answers = await converse(source.open_session, tokenizer)
            assert answers == expected  # token for token the single-process answers
            session = conversation.session
            # Every token of the conversation went through the pipeline exactly once (the last sampled is unfed).
            assert session.fed_tokens == len(session.history) - 1 == local_fed
            swarm_turn = conversation.last_turn
            assert swarm_turn.reused_cache and swarm_turn.prefilled == local_turn.prefilled

            snapshot = snapshot_from_source(source.state())
            assert [s.peer for s in snapshot.plan.stages][0] == "me"
            assert sorted(s.peer for s in snapshot.plan.stages[1:]) == ["local-1", "local-2"]
            assert (snapshot.plan.stages[0].start, snapshot.plan.stages[0].end) == (0, 1)
            assert {p.name for p in snapshot.peers} == {"me", "local-1", "local-2"}
            assert len(snapshot.links) == 3 and all(link.bandwidth_bps for link in snapshot.links)
            await conversation.aclose()
            await conversation.aclose()  # idempotent
