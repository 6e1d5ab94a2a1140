"""The live view's data (peers, links, plan, per-stage load, recoveries) as JSON.

Built from the same snapshot the terminal views draw (swarm.view.from_source) of the
source's one ``state()``, so the HTTP API, the web page and `swarm top` never disagree.
GET /v1/swarm answers it once; GET /api/swarm/events pushes it to the web page.
"""

from __future__ import annotations

import dataclasses

from swarm.source_state import SourceState
from swarm.view.from_source import snapshot_from_source
from swarm.view.snapshot import SwarmSnapshot


def snapshot_json(snapshot: SwarmSnapshot, requests: dict[str, int]) -> dict:
    """The snapshot as plain JSON, plus the server's own request counts."""
    body = dataclasses.asdict(snapshot)
    body["requests"] = dict(requests)
    return body


def swarm_json(state: SourceState, requests: dict[str, int]) -> dict:
    """snapshot_json of the state, with what the planner predicted beside what was measured,
    the recoveries and the weights moving to peers in words, and whether the swarm is deployed."""
    body = snapshot_json(snapshot_from_source(state), requests)
    plan = state.plan
    if body["plan"] is not None and plan is not None:
        for stage, compute_s in zip(body["plan"]["stages"], plan.compute_s):
            stage["predicted_step_ms"] = 1e3 * compute_s
            stage["predicted_busy_share"] = min(1.0, compute_s / plan.cycle_s) if plan.cycle_s > 0 else None
        body["plan"]["predicted_tokens_per_s"] = 1.0 / plan.latency_s if plan.latency_s > 0 else None
    body["recoveries"] = [{"text": event.describe(), "lost": list(event.lost), "peers": event.peers,
                           "failed": event.error is not None} for event in state.recoveries]
    snapshot_lines = dict(zip(sorted(state.transfers), body["transfers"]))  # the view's own words
    body["transfers"] = [{"peer": name, **t, "text": snapshot_lines[name]} for name, t in sorted(state.transfers.items())]
    body["deployed"], body["recovering"] = state.deployed, state.recovering
    body["diagnostic"] = "" if state.announcements else state.diagnostic
    return body
