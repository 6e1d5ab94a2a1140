"""GET /v1/swarm: the live view's data (peers, links, plan, per-stage load) as JSON.

Built from the same snapshot the terminal views draw (swarm.view.from_source) of the
source's one ``state()``, so the HTTP API and `swarm top` never disagree.
"""

from __future__ import annotations

import dataclasses

from swarm.view.snapshot import SwarmSnapshot


def snapshot_json(snapshot: SwarmSnapshot, requests: dict[str, int]) -> dict:
    """The snapshot as plain JSON, plus the server's own request counts."""
    body = dataclasses.asdict(snapshot)
    body["requests"] = dict(requests)
    return body
