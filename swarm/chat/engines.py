"""What the chat needs beside a Session: errors a person can act on, and a token rate."""

from __future__ import annotations

import time


class BackendError(RuntimeError):
    """Something a person can act on: no peers, not enough memory, a lost peer."""


class TokenRate:
    """Tokens per second over the last few tokens; None when idle."""

    WINDOW = 32
    IDLE_S = 2.0

    def __init__(self) -> None:
        self._times: list[float] = []

    def tick(self) -> None:
        self._times = self._times[-(self.WINDOW - 1):] + [time.perf_counter()]

    def value(self) -> float | None:
        t = self._times
        if len(t) < 2 or time.perf_counter() - t[-1] > self.IDLE_S:
            return None
        return (len(t) - 1) / (t[-1] - t[0])
