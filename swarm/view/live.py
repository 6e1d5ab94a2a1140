"""Refreshing a rich Live display from an asyncio task.

rich's own refresh thread would render while the event loop mutates the objects
it reads. Here the Live is created with ``auto_refresh=False`` and this task, on
the loop, takes a frozen snapshot and renders it, so nothing is read mid-update.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from rich.console import RenderableType
from rich.live import Live

from swarm.view.render import topology
from swarm.view.snapshot import SwarmSnapshot

REFRESH_S = 0.5


async def refresh_forever(
    live: Live,
    take_snapshot: Callable[[], SwarmSnapshot],
    render: Callable[[SwarmSnapshot], RenderableType] = topology,
    interval_s: float = REFRESH_S,
) -> None:
    """Redraw ``live`` from ``take_snapshot()`` every ``interval_s`` until cancelled.

    The caller owns the task (put it in a TaskGroup and cancel it when done).
    """
    while True:
        live.update(render(take_snapshot()), refresh=True)
        await asyncio.sleep(interval_s)
