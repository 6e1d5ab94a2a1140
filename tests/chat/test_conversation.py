"""A chat's second turn reuses the first turn's KV cache, and answers exactly as a recomputation would."""

from __future__ import annotations

import asyncio

import pytest
from swarm.chat.engines import ChainEngine
from swarm.model import hf
from swarm.model.local import LocalChain
from swarm.model.shard import Shard
from swarm.chat.conversation import ContextFull, Conversation

pytestmark = pytest.mark.slow  # the real default model


@pytest.fixture(scope="module")
def smollm(smollm2_dir):
    model_dir = smollm2_dir
    chain = LocalChain([Shard.load(model_dir, 0, 32, max_slots=2, max_len=512)])
    return chain, hf.load_tokenizer(model_dir)


async def collect(conversation: Conversation, text: str, stop: asyncio.Event | None = None) -> str:
    return "".join([piece async for piece in conversation.ask(text, stop)])


async def test_second_turn_prefills_only_the_new_tokens(smollm):
    chain, tokenizer = smollm
    engine = ChainEngine(chain, slot=0)
    conversation = Conversation(engine, tokenizer, max_new_tokens=12)
    await conversation.reset()
    ran_before = chain.shards[0].prefilled_tokens  # the module's other tests share the chain

    first = await collect(conversation, "What is the capital of France?")
    assert "Paris" in first
    first_prompt = hf.chat_token_ids(tokenizer, conversation.messages[:1])
    assert conversation.last_turn.prefilled == len(first_prompt)
    assert not conversation.last_turn.reused_cache  # nothing was cached before

    second = await collect(conversation, "And of Italy?")
    turn = conversation.last_turn
    whole = hf.chat_token_ids(tokenizer, conversation.messages[:3])
    assert turn.reused_cache
    # Only the end of the first answer, the new question and the assistant header were prefilled.
    assert 0 < turn.prefilled < len(whole) - len(first_prompt)
    assert engine.prefilled_tokens == len(first_prompt) + turn.prefilled
    # The shard's own count of tokens it ran: nothing of the first turn ran twice.
    assert chain.shards[0].prefilled_tokens - ran_before == len(engine.fed)
    assert engine.fed[: len(first_prompt)] == first_prompt
    # What the cache holds reads back as the conversation rendered by the chat template.
    assert tokenizer.decode(engine.fed).startswith(tokenizer.decode(whole))

    # Exactness: a fresh sequence prefilled with all of it at once gives the same answer.
    fresh = ChainEngine(chain, slot=1)
    await fresh.reset()
    history = engine.fed[: len(engine.fed) - (turn.generated - 1)]
    stop_ids = conversation.stop_ids
    again = [t async for t in fresh.generate(history, 12, stop_ids, asyncio.Event())]
    assert tokenizer.decode([t for t in again if t not in stop_ids], skip_special_tokens=True) == second


async def test_stopping_an_answer_keeps_what_was_said(smollm):
    chain, tokenizer = smollm
    engine = ChainEngine(chain, slot=0)
    conversation = Conversation(engine, tokenizer, max_new_tokens=64)
    await conversation.reset()
    stop = asyncio.Event()
    pieces = []
    async for piece in conversation.ask("Write a long poem about the sea.", stop):
        pieces.append(piece)
        if len(pieces) == 3:
            stop.set()
    turn = conversation.last_turn
    assert turn.stopped and turn.generated <= 4
    assert conversation.messages[-1] == {"role": "assistant", "content": "".join(pieces)}
    await collect(conversation, "Thanks!")
    assert conversation.last_turn.reused_cache

    await conversation.reset()
    assert conversation.messages == [] and engine.fed == []
    await collect(conversation, "Hi")
    assert conversation.last_turn.prefilled == len(hf.chat_token_ids(tokenizer, conversation.messages[:1]))


async def test_a_conversation_too_long_for_the_cache_is_refused_before_computing(smollm2_dir):
    chain = LocalChain([Shard.load(smollm2_dir, 0, 32, max_len=64)])
    tokenizer = hf.load_tokenizer(smollm2_dir)
    engine = ChainEngine(chain)
    conversation = Conversation(engine, tokenizer, max_new_tokens=8)
    await conversation.reset()
    await collect(conversation, "Hi")
    used = len(engine.fed)
    with pytest.raises(ContextFull):
        await collect(conversation, "Tell me everything about the history of Rome. " * 3)
    assert len(engine.fed) == used  # nothing was computed
    assert conversation.messages[-1]["role"] == "assistant"  # the refused question was not kept
    await conversation.reset()
    assert "Hi" not in [m["content"] for m in conversation.messages]
    assert await collect(conversation, "Hi")
