"""One validated request through the swarm: prompt ids, a pipeline session, text deltas.

Every request holds one session (one KV slot) of the source's pipeline from before
its first token until its last; the pipeline admits and retires sequences between
steps, so concurrent requests share micro-batches instead of queueing behind each
other. The source calls made here are exactly ``source.open_session(sampling, speculate=...)``
and, on the session, ``generate(prompt, max_new_tokens, stop_ids)``, ``speculator`` and
``aclose()`` (through ``async with``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Collection

from swarm.model import hf
from swarm.model.sampling import SamplingParams
from swarm.model.stopping import finish_reason
from swarm.planner.problem import InfeasibleError
from swarm.runtime.client import PeerError
from swarm.runtime.speculate import Speculation
from swarm.serve.protocol import ApiError, GenerationRequest, bad_field, context_error
from swarm.serve.text import AnswerText

log = logging.getLogger(__name__)


def unavailable(reason: str) -> ApiError:
    return ApiError(503, reason, type="service_unavailable", code="swarm_unavailable")


def no_swarm_reason(exc: InfeasibleError, live_peers: int) -> str:
    hint = ("no peers found: start `swarm join` on another device, or `swarm serve --local 2` to start peers here"
            if live_peers == 0 else
            f"{live_peers} peer(s) live: add peers (`swarm join`), give them more memory (--mem), "
            "or shorten the context (--max-len)")
    return f"no swarm can be formed: {exc}; {hint}"


@dataclass
class Answer:
    """What one request produced; filled in while it streams. Times are time.monotonic()."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" (stop token or string) or "length"
    began: float = field(default_factory=time.monotonic)  # the request was validated
    opened: float | None = None  # it got its session (a KV slot of the deployed pipeline)
    first_token: float | None = None  # the prompt was processed and the first token sampled
    ended: float | None = None  # the last token came back
    # Drafts verified and accepted for this request ({"verify_steps", "drafted", "accepted"});
    # None when it did not speculate.
    speculation: dict[str, int] | None = None


class Generator:
    """Turns requests into pipeline sessions and token ids into text."""

    def __init__(self, source: Any, tokenizer: Any, max_len: int, defaults: SamplingParams,
                 stop_ids: Collection[int]) -> None:
        self.source, self.tokenizer, self.max_len = source, tokenizer, max_len
        self.defaults, self.stop_ids = defaults, frozenset(stop_ids)
        self.active = 0  # requests holding a session now
        self.waiting = 0  # requests waiting for a session (every slot taken, or planning)
        self.generated = 0  # tokens generated since start
        self.served = 0  # requests finished
        # The first deployment (or a retry after "no swarm") runs once, not once per waiting request.
        self._deploying = asyncio.Lock()
        self._deployed = False

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.chat:
            return hf.chat_token_ids(self.tokenizer, list(request.messages))
        if isinstance(request.prompt, tuple):
            vocab = len(self.tokenizer)
            if max(request.prompt) >= vocab:
                raise bad_field("prompt", f"token ids must be below the vocabulary size {vocab}")
            return list(request.prompt)
        return list(self.tokenizer(request.prompt)["input_ids"])

    def sampling(self, request: GenerationRequest) -> SamplingParams:
        asked, d = request.sampling, self.defaults
        return SamplingParams(
            temperature=d.temperature if asked.temperature is None else asked.temperature,
            top_k=d.top_k if asked.top_k is None else asked.top_k,
            top_p=d.top_p if asked.top_p is None else asked.top_p,
            seed=d.seed if asked.seed is None else asked.seed)

    def budget(self, request: GenerationRequest, prompt: list[int]) -> int:
        """max_tokens, or what the context leaves; 400 context_length_exceeded if it cannot fit."""
        error = context_error(len(prompt), request.max_tokens, self.max_len)
        if error is not None:
            raise error
        return request.max_tokens or self.max_len - len(prompt)

    @contextlib.asynccontextmanager
    async def answer(self, request: GenerationRequest) -> AsyncIterator[tuple[AsyncIterator[str], Answer]]:
        """(text deltas, Answer) of one request, for every API's handler: prompt, budget, session.

        The deltas end (and the turn is cancelled) before the session closes, even when the
        client went away and its handler was cancelled mid-answer."""
        prompt = self.prompt_ids(request)
        max_tokens = self.budget(request, prompt)
        answer = Answer(prompt_tokens=len(prompt))
        session = await self.open_session(self.sampling(request), request.speculate)
        answer.opened = time.monotonic()
        async with session, contextlib.aclosing(self.stream(session, request, prompt, max_tokens, answer)) as deltas:
            yield deltas, answer

    async def open_session(self, sampling: SamplingParams, speculate: str | None = None):
        """A session of the deployed pipeline; 503 with the reason when no swarm can be formed.
        ``speculate``: the request's mode ("off" | "ngram"); None: the server's --speculate."""
        mode = None if speculate is None else Speculation(speculate)
        try:
            self.waiting += 1
            if self._deployed:
                return await self.source.open_session(sampling, speculate=mode)
            async with self._deploying:
                session = await self.source.open_session(sampling, speculate=mode)
                self._deployed = True
                return session
        except InfeasibleError as exc:
            live = len(self.source.state().announcements)
            raise unavailable(no_swarm_reason(exc, live)) from None
        except PeerError as exc:
            raise unavailable(f"a peer of the swarm did not answer: {exc}") from None
        finally:
            self.waiting -= 1

    async def stream(self, session: Any, request: GenerationRequest, prompt: list[int], max_tokens: int,
                     answer: Answer) -> AsyncIterator[str]:
        """Text deltas of one answer; ``answer`` holds the counts and finish reason at the end.

        The pipeline ends the turn on a stop token or at ``max_tokens`` (``stopping.finish_reason``
        names which); a stop string ends it here at once (the slot is freed when the session closes)."""
        stop_ids = frozenset() if request.ignore_eos else self.stop_ids
        text = AnswerText(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), request.stop,
                          self.stop_ids)
        self.active += 1
        try:
            async with contextlib.aclosing(session.generate(prompt, max_tokens, stop_ids)) as tokens:
                async for token in tokens:
                    if answer.first_token is None:
                        answer.first_token = time.monotonic()
                    answer.completion_tokens += 1
                    self.generated += 1
                    if delta := text.push(token):
                        yield delta
                    if text.stopped:
                        answer.finish_reason = "stop"
                        break
                    answer.finish_reason = finish_reason(answer.completion_tokens, max_tokens, token, stop_ids)
        except PeerError as exc:
            raise unavailable(f"a peer of the swarm was lost mid-answer: {exc}") from None
        finally:
            self.active -= 1
            answer.ended = time.monotonic()
            if session.speculator is not None:
                answer.speculation = dataclasses.asdict(session.speculator.stats)
        answer.finish_reason = answer.finish_reason or "length"
        if rest := text.finish():
            yield rest
        self.served += 1
