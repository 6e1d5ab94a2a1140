"""Waiting and cancelling, written once so that no await can outlive its owner.

On Python 3.11 ``asyncio.wait_for`` swallows a cancellation that arrives in the
same loop iteration as the awaited result (it returns the result; fixed in 3.12).
A loop that waits that way survives its TaskGroup's one cancel and runs for ever:
that is what hung the test suite (``Directory._heartbeats`` woke on an event set
by the seed loop at the moment it was cancelled). So swarm never calls
``wait_for`` (tests/test_async_rules.py checks): bounds are ``asyncio.timeout``
blocks, which count cancellations and let every outside one through.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

T = TypeVar("T")


async def bounded(awaitable: Awaitable[T], timeout: float) -> T:
    """``await awaitable``, or TimeoutError after ``timeout`` seconds: ``asyncio.wait_for``
    without its 3.11 flaw (and without a task of its own: it runs in the caller's)."""
    async with asyncio.timeout(timeout):
        return await awaitable


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds pass; True if it was set."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def cancel_and_wait(*tasks: asyncio.Task | None) -> None:
    """Cancel tasks this caller owns and wait until they have ended.

    Their results and exceptions stay with the tasks (nothing is raised here); a
    cancellation of the caller itself still propagates, unlike
    ``suppress(CancelledError): await task``, which would swallow it.
    """
    pending = [t for t in tasks if t is not None and not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
