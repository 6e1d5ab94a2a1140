"""A chat's second turn reuses the first turn's KV cache, and answers exactly as a recomputation
would (SmolLM2, a source-only pipeline: what `swarm chat --no-swarm` runs)."""

from __future__ import annotations

import pytest

from swarm.chat.conversation import ContextFull, Conversation
from swarm.model import hf
from swarm.runtime.deploy import StagePlacement
from swarm.runtime.engine import Pipeline, PipelineConfig
from swarm.runtime.schedule import Layout

pytestmark = pytest.mark.slow  # the real default model

UNITS = 32  # SmolLM2-135M: embedding + 30 blocks + head


def source_only(model_dir, slots: int = 2, max_len: int = 512) -> Pipeline:
    return Pipeline(PipelineConfig(model_dir, (StagePlacement(None, 0, UNITS),), layout=Layout(1, slots),
                                   max_len=max_len))


async def collect(conversation: Conversation, text: str) -> str:
    return "".join([piece async for piece in conversation.ask(text)])


async def test_second_turn_prefills_only_the_new_tokens(smollm2_dir):
    tokenizer = hf.load_tokenizer(smollm2_dir)
    async with source_only(smollm2_dir) as pipe:
        conversation = Conversation(pipe.open_session, tokenizer, max_new_tokens=12)
        first = await collect(conversation, "What is the capital of France?")
        assert "Paris" in first
        first_prompt = hf.chat_token_ids(tokenizer, conversation.messages[:1])
        assert conversation.last_turn.prefilled == len(first_prompt)
        assert not conversation.last_turn.reused_cache  # nothing was cached before

        second = await collect(conversation, "And of Italy?")
        turn = conversation.last_turn
        session = conversation.session
        whole = hf.chat_token_ids(tokenizer, conversation.messages[:3])
        assert turn.reused_cache
        # Only the end of the first answer, the new question and the assistant header were prefilled.
        assert 0 < turn.prefilled < len(whole) - len(first_prompt)
        # The runtime's own count: nothing of the first turn ran twice (the last sampled token is unfed).
        assert session.fed_tokens == len(session.history) - 1
        assert list(session.history[: len(first_prompt)]) == first_prompt
        # What the cache holds reads back as the conversation rendered by the chat template.
        assert tokenizer.decode(session.history).startswith(tokenizer.decode(whole))

        # Exactness: a fresh sequence prefilled with all of it at once gives the same answer.
        prefix = list(session.history[: len(session.history) - turn.generated])
        async with await pipe.open_session() as fresh:
            again = [t async for t in fresh.generate(prefix, 12, conversation.stop_ids)]
        stop_ids = conversation.stop_ids
        assert tokenizer.decode([t for t in again if t not in stop_ids], skip_special_tokens=True) == second
        await conversation.aclose()


async def test_stopping_an_answer_keeps_what_was_said(smollm2_dir):
    tokenizer = hf.load_tokenizer(smollm2_dir)
    async with source_only(smollm2_dir) as pipe:
        conversation = Conversation(pipe.open_session, tokenizer, max_new_tokens=64)
        pieces = []
        async for piece in conversation.ask("Write a long poem about the sea."):
            pieces.append(piece)
            if len(pieces) == 3:
                conversation.stop()
        turn = conversation.last_turn
        assert turn.stopped and turn.generated <= 4
        assert conversation.messages[-1] == {"role": "assistant", "content": "".join(pieces)}
        await collect(conversation, "Thanks!")
        assert conversation.last_turn.reused_cache

        await conversation.reset()
        assert conversation.messages == [] and conversation.session is None
        await collect(conversation, "Hi")
        assert conversation.last_turn.prefilled == len(hf.chat_token_ids(tokenizer, conversation.messages[:1]))
        await conversation.aclose()


async def test_a_conversation_too_long_for_the_cache_is_refused_before_computing(smollm2_dir):
    tokenizer = hf.load_tokenizer(smollm2_dir)
    async with source_only(smollm2_dir, slots=1, max_len=64) as pipe:
        conversation = Conversation(pipe.open_session, tokenizer, max_new_tokens=8)
        await collect(conversation, "Hi")
        session = conversation.session
        used = session.fed_tokens
        with pytest.raises(ContextFull):
            await collect(conversation, "Tell me everything about the history of Rome. " * 3)
        assert session.fed_tokens == used  # nothing was computed
        assert conversation.messages[-1]["role"] == "assistant"  # the refused question was not kept
        await conversation.reset()
        assert await collect(conversation, "Hi")
        await conversation.aclose()
