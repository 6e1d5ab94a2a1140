"""From sampled token ids to the text a client sees, and server-sent events (pure).

``AnswerText`` turns a growing list of token ids into text deltas: it decodes the
whole answer each time (a character can span several tokens, and a byte-level
tokenizer shows an unfinished one as U+FFFD, which is held back), cuts the answer
at the first stop string, and holds back any tail that could still become one,
so streamed and non-streamed answers are the same text.
"""

from __future__ import annotations

import json
from typing import Callable, Collection, Sequence

SSE_DONE = b"data: [DONE]\n\n"
REPLACEMENT = "\ufffd"  # what decoding shows for an unfinished multi-byte character


def sse_event(payload: dict) -> bytes:
    """One server-sent event carrying a JSON payload (OpenAI's stream format)."""
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is the start of some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def cut_at_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest stop string in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


class AnswerText:
    """The visible text of one answer, fed token by token.

    ``decode(ids) -> str`` is the tokenizer's decode with special tokens skipped;
    ``stop_ids`` (end of turn/sequence) end the answer and are never shown.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: Sequence[str] = (),
                 stop_ids: Collection[int] = ()) -> None:
        self._decode, self._stops, self._stop_ids = decode, tuple(stop_strings), frozenset(stop_ids)
        self._ids: list[int] = []
        self.text = ""  # what was handed out so far
        self.stopped = False  # a stop string was found: the answer is over

    def push(self, token: int) -> str:
        """The new text this token makes visible (often ""; never after a stop)."""
        if self.stopped or token in self._stop_ids:
            return ""
        self._ids.append(token)
        full = self._decode(self._ids)
        cut = cut_at_stop(full, self._stops)
        if cut is not None:
            self.stopped = True
            return self._advance(full[:cut])
        if full.endswith(REPLACEMENT):
            return ""
        return self._advance(full[:len(full) - held_back(full, self._stops)])

    def finish(self) -> str:
        """The rest once generation ended without a stop string (a held tail was not a stop)."""
        if self.stopped:
            return ""
        full = self._decode(self._ids)
        cut = cut_at_stop(full, self._stops)
        return self._advance(full if cut is None else full[:cut])

    def _advance(self, visible: str) -> str:
        if len(visible) <= len(self.text) or not visible.startswith(self.text):
            return ""
        new, self.text = visible[len(self.text):], visible
        return new
