"""Byte counts and transfers as people read them (stdlib only: the source's messages and the views share it)."""

from __future__ import annotations


def format_bytes(n: float | None) -> str:
    """1536 -> "1.5 KiB"; None -> "-"."""
    if n is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def describe_transfer(done: int, total: int, rate_bps: float) -> str:
    """'12.0 MB / 40.0 MB at 8.1 MB/s, 3 s left' (the join's log line, the source's progress line)."""
    text = f"{done / 1e6:.1f} MB / {total / 1e6:.1f} MB"
    if rate_bps > 0:
        text += f" at {rate_bps / 1e6:.1f} MB/s, {max(0.0, total - done) / rate_bps:.0f} s left"
    return text
