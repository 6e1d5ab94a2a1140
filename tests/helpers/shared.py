"""Processes a test module shares between its tests (peers started once, restarted after a
test killed one): the per-test leak check leaves them to the module, which stops them at
its end, and the run's own check at the session's end still catches any left."""

from __future__ import annotations

SHARED_PIDS: set[int] = set()
