"""A chat conversation over one sequence of the pipeline, reusing the KV cache of earlier turns.

The conversation is what a chat shows and remembers: messages rendered with the
model's chat template. Each turn only the text the template adds after what the
sequence already holds (the end of the last answer, the new user message, the
assistant header) is tokenized and fed; earlier turns stay in the cache.

No torch here: the sequence is a ``swarm.runtime.session.Session`` (or anything with
its shape) opened by ``open_session``; the tokenizer is any object with
``apply_chat_template``, ``encode`` and ``decode``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

from swarm.model.stopping import stop_token_ids
from swarm.runtime.schedule import ContextFull

log = logging.getLogger(__name__)

__all__ = ["ContextFull", "Conversation", "SessionLike", "Turn"]

DEFAULT_MAX_NEW_TOKENS = 256


class SessionLike(Protocol):
    """What a conversation needs of a sequence (swarm.runtime.session.Session).

    ``generate`` feeds ``new_tokens`` and yields sampled tokens until a stop id (yielded
    last) or ``max_new_tokens``; every yielded token belongs to the sequence afterwards.
    A turn that would overflow the KV cache raises ContextFull before computing."""

    @property
    def history(self) -> tuple[int, ...]: ...

    @property
    def fed_tokens(self) -> int: ...

    def generate(self, new_tokens: list[int], max_new_tokens: int,
                 stop_ids: Collection[int] = ()) -> AsyncIterator[int]: ...

    def cancel(self) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class Turn:
    """What one answer cost: tokens fed for it (beyond one per generated token) and tokens generated."""

    prefilled: int
    generated: int
    stopped: bool  # the person interrupted it
    reused_cache: bool  # earlier turns were not recomputed
    recomputed: bool = False  # earlier turns had to be computed again (the template did not extend them, or after an error)


class Conversation:
    """Messages, and the text of every token its session's sequence holds."""

    def __init__(self, open_session: Callable[[], Awaitable[SessionLike]], tokenizer: Any, *,
                 system: str | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 stop_ids: Collection[int] | None = None) -> None:
        self._open_session, self.tokenizer = open_session, tokenizer
        self.system, self.max_new_tokens = system, max_new_tokens
        # stopping.stop_token_ids; give the model's (with hf.generation_eos_ids) where it is known
        self.stop_ids = frozenset(stop_token_ids(tokenizer) if stop_ids is None else stop_ids)
        self.messages: list[dict[str, str]] = []
        self.session: SessionLike | None = None
        self._held_text = ""  # the text of every token in the session's sequence
        self.last_turn: Turn | None = None
        self._stopped = False

    def _render(self, messages: list[dict[str, str]]) -> str:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return self.tokenizer.apply_chat_template(head + messages, tokenize=False, add_generation_prompt=True)

    async def _drop_session(self) -> None:
        session, self.session, self._held_text = self.session, None, ""
        if session is not None:
            await session.aclose()

    async def reset(self) -> None:
        """Forget the conversation (and free its sequence)."""
        await self._drop_session()
        self.messages.clear()

    async def aclose(self) -> None:
        await self._drop_session()

    def stop(self) -> None:
        """End the answer being generated now; what was said so far stays."""
        self._stopped = True
        if self.session is not None:
            self.session.cancel()

    async def ask(self, text: str) -> AsyncIterator[str]:
        """Answer one user message, yielding the answer's text as it is generated."""
        self._stopped = False
        target = self._render(self.messages + [{"role": "user", "content": text}])
        reused = self.session is not None and target.startswith(self._held_text)
        recomputed = not reused and bool(self.messages)
        if not reused:
            if self.session is not None:
                log.info("chat template does not extend the cached text; recomputing the conversation")
            await self._drop_session()
            self.session = await self._open_session()
        session = self.session
        new_ids = self.tokenizer.encode(target[len(self._held_text):], add_special_tokens=False)
        self.messages.append({"role": "user", "content": text})
        fed_before = session.fed_tokens

        answer_ids: list[int] = []
        shown = ""
        try:
            async for token in session.generate(new_ids, self.max_new_tokens, self.stop_ids):
                answer_ids.append(token)
                # Decode the whole answer each time: a character can span several tokens.
                decoded = self.tokenizer.decode(answer_ids, skip_special_tokens=True)
                if not decoded.endswith("\ufffd") and len(decoded) > len(shown):
                    yield decoded[len(shown):]
                    shown = decoded
        except BaseException:
            # Forget this question; the sequence is given up and the next question recomputes
            # the conversation (a turn refused as too long changed nothing, but is rare enough).
            self.messages.pop()
            await self._drop_session()
            raise
        self._held_text = target + self.tokenizer.decode(answer_ids, skip_special_tokens=False)
        answer = self.tokenizer.decode([t for t in answer_ids if t not in self.stop_ids], skip_special_tokens=True)
        if len(answer) > len(shown):
            yield answer[len(shown):]
        self.messages.append({"role": "assistant", "content": answer})
        self.last_turn = Turn(
            # Each generated token but the last was fed once: the rest was the turn's prefill
            # (plus a replay of the whole sequence if a stage was lost meanwhile).
            prefilled=session.fed_tokens - fed_before - max(len(answer_ids) - 1, 0),
            generated=len(answer_ids),
            stopped=self._stopped,
            reused_cache=reused,
            recomputed=recomputed,
        )
