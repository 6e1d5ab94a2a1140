"""A chat conversation over a token engine, reusing the KV cache of earlier turns.

The conversation is what a chat shows and remembers: messages rendered with the
model's chat template. Each turn only the text the template adds after what the
engine already holds (the end of the last answer, the new user message, the
assistant header) is tokenized and prefilled; earlier turns stay in the cache.

No torch here: the engine runs the model (a local chain or a swarm pipeline), the
tokenizer is any object with ``apply_chat_template``, ``encode`` and ``decode``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

# End-of-turn tokens of common chat templates; the answer stops at any that exist.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
DEFAULT_MAX_NEW_TOKENS = 256


class ContextFull(RuntimeError):
    """The conversation no longer fits the engine's KV cache (start a new one)."""


class TokenEngine(Protocol):
    """One sequence in a model, continued step by step.

    Contract of ``generate``: ``new_ids`` are appended to the sequence, then sampled
    tokens are yielded one by one until a stop id, ``max_new_tokens`` or ``stop`` is
    set. Every yielded token belongs to the sequence afterwards: the engine feeds the
    last one at the start of the next call (so a turn costs only its new tokens).
    A turn that would overflow the KV cache raises ContextFull before computing.
    """

    prefilled_tokens: int  # tokens fed as prompts (the first step of each generate call)

    async def reset(self) -> None: ...

    def generate(self, new_ids: list[int], max_new_tokens: int, stop_ids: frozenset[int],
                 stop: asyncio.Event) -> AsyncIterator[int]: ...


@dataclass(frozen=True)
class Turn:
    """What one answer cost: tokens prefilled for it and tokens generated."""

    prefilled: int
    generated: int
    stopped: bool  # the person interrupted it
    reused_cache: bool  # earlier turns were not recomputed
    recomputed: bool = False  # earlier turns had to be computed again (e.g. after a peer was lost)


def stop_token_ids(tokenizer: Any) -> frozenset[int]:
    """The end-of-sequence id plus the chat template's end-of-turn ids that the vocabulary has."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    unknown = getattr(tokenizer, "unk_token_id", None)
    for token in END_OF_TURN_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != unknown:
            ids.add(token_id)
    return frozenset(ids)


class Conversation:
    """Messages, and the text of every token the engine's sequence holds."""

    def __init__(self, engine: TokenEngine, tokenizer: Any, *, system: str | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self.system, self.max_new_tokens = system, max_new_tokens
        self.stop_ids = stop_token_ids(tokenizer)
        self.messages: list[dict[str, str]] = []
        self._held_text = ""  # the text of every token in the engine's sequence
        self.last_turn: Turn | None = None
        self._fresh = True  # the engine holds nothing yet

    def _render(self, messages: list[dict[str, str]]) -> str:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return self.tokenizer.apply_chat_template(head + messages, tokenize=False, add_generation_prompt=True)

    async def reset(self) -> None:
        """Forget the conversation and start a new sequence in the engine."""
        await self.engine.reset()
        self.messages.clear()
        self._held_text, self._fresh = "", True

    async def ask(self, text: str, stop: asyncio.Event | None = None) -> AsyncIterator[str]:
        """Answer one user message, yielding the answer's text as it is generated.

        Setting ``stop`` ends the answer after the current token; what was said so
        far stays in the conversation (and in the cache).
        """
        stop = stop or asyncio.Event()
        target = self._render(self.messages + [{"role": "user", "content": text}])
        reused = not self._fresh and target.startswith(self._held_text)
        recomputed = not reused and bool(self.messages)
        if not reused:
            if not self._fresh:
                log.info("chat template does not extend the cached text; recomputing the conversation")
            await self.engine.reset()
            self._held_text = ""
        new_ids = self.tokenizer.encode(target[len(self._held_text):], add_special_tokens=False)
        self._fresh = False
        self.messages.append({"role": "user", "content": text})
        before = self.engine.prefilled_tokens

        answer_ids: list[int] = []
        shown = ""
        self._held_text = target
        try:
            async for token in self.engine.generate(new_ids, self.max_new_tokens, self.stop_ids, stop):
                answer_ids.append(token)
                if token in self.stop_ids:
                    break
                # Decode the whole answer each time: a character can span several tokens.
                decoded = self.tokenizer.decode(answer_ids, skip_special_tokens=True)
                if not decoded.endswith("\ufffd") and len(decoded) > len(shown):
                    yield decoded[len(shown):]
                    shown = decoded
        except BaseException:
            # The engine's state is unknown (a peer lost, the program leaving): forget
            # this question and recompute the conversation on the next one.
            self.messages.pop()
            self._fresh = True
            raise
        answer = self.tokenizer.decode([t for t in answer_ids if t not in self.stop_ids], skip_special_tokens=True)
        if len(answer) > len(shown):
            yield answer[len(shown):]
        self._held_text += self.tokenizer.decode(answer_ids, skip_special_tokens=False)
        self.messages.append({"role": "assistant", "content": answer})
        self.last_turn = Turn(
            prefilled=self.engine.prefilled_tokens - before,
            generated=len(answer_ids),
            stopped=stop.is_set(),
            reused_cache=reused,
            recomputed=recomputed,
        )
