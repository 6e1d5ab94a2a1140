"""A conversation over a local swarm of two peers: same answers as one process, and the
second turn computes only its new tokens (the runtime's own count)."""

from __future__ import annotations

import pytest

from swarm.chat.engines import ChainEngine, SourceView, SwarmEngine
from swarm.localswarm import LocalSwarm, local_budgets, unit_memory
from swarm.model import hf
from swarm.model.local import LocalChain
from swarm.model.profile import profile_device
from swarm.model.sampling import GREEDY
from swarm.model.shard import Shard
from swarm.source import SourceConfig
from swarm.chat.conversation import Conversation

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "And of Italy?"]
MAX_LEN = 512


async def converse(engine, tokenizer) -> tuple[Conversation, list[str]]:
    conversation = Conversation(engine, tokenizer, max_new_tokens=16)
    await conversation.reset()
    answers = []
    for question in QUESTIONS:
        answers.append("".join([piece async for piece in conversation.ask(question)]))
    return conversation, answers


async def test_swarm_conversation_matches_one_process_and_reuses_the_cache(smollm2_dir, tmp_path):
    tokenizer = hf.load_tokenizer(smollm2_dir)
    local_conversation, expected = await converse(
        ChainEngine(LocalChain([Shard.load(smollm2_dir, 0, 32, max_len=MAX_LEN)])), tokenizer)

    local = LocalSwarm.for_model(smollm2_dir, 2, max_len=MAX_LEN, log_dir=tmp_path, extra_args=("--heartbeat", "0.3"))
    async with local:
        assert local.source_settings() == {"interfaces": ["127.0.0.1"], "seeds": local.seeds, "mdns": False,
                                           "mem_bytes": local_budgets(unit_memory(smollm2_dir, 1, MAX_LEN), 2).source,
                                           "min_peers": 2}
        profile = profile_device(smollm2_dir, threads=1).to_json()
        config = SourceConfig(model=smollm2_dir, name="me", profile=profile, max_len=MAX_LEN,
                              **local.source_settings())
        engine = SwarmEngine(config, GREEDY)
        try:
            await engine.start()
            conversation, answers = await converse(engine, tokenizer)
            assert answers == expected  # token for token the single-process chain's answers
            session = engine.session
            # Every token of the conversation went through the pipeline exactly once.
            assert session.prefilled_tokens == len(session.history)
            swarm_turn, local_turn = conversation.last_turn, local_conversation.last_turn
            assert swarm_turn.reused_cache and swarm_turn.prefilled == local_turn.prefilled
            assert engine.prefilled_tokens == local_conversation.engine.prefilled_tokens

            snapshot = SourceView(engine, "SmolLM2").snapshot()
            assert [s.peer for s in snapshot.plan.stages][0] == "me"
            assert sorted(s.peer for s in snapshot.plan.stages[1:]) == ["local-1", "local-2"]
            assert (snapshot.plan.stages[0].start, snapshot.plan.stages[0].end) == (0, 1)
            assert {p.name for p in snapshot.peers} == {"me", "local-1", "local-2"}
            assert len(snapshot.links) == 3 and all(link.bandwidth_bps for link in snapshot.links)
        finally:
            await engine.aclose()
            await engine.aclose()  # idempotent
