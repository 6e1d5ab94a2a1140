"""Reading rich renderables as text in the view tests."""

from __future__ import annotations

import io

from rich.console import Console


def render_text(renderable, width: int = 120) -> str:
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None)
    console.print(renderable)
    return console.export_text()


def cells(line: str) -> list[str]:
    """The cells of a table row drawn inside the view's panel (both borders dropped)."""
    return [c.strip() for c in line.split("│")[2:-2]]
