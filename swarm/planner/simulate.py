"""Pipeline simulator: what a plan's stage and hop times give in tokens per second.

Decoding is a closed loop: a micro-batch cannot start token t+1 before token t is
back at the source. Every stage and every hop (the return hop included) is a server
that handles one micro-batch step at a time, first come first served.

- no per-token barrier (the paper's No-Bubbles): steady rate b * min(m / R, 1 / P)
- per-token barrier (Bubbles, GPipe-style): a round of m micro-batches takes
  R + (m - 1) * P (flow-shop makespan of identical jobs), rate b * m / (R + (m - 1) P)

R = sum of all stage and hop times, P = the largest. With `generated_tokens` set, an
event simulation runs the whole workload (one prefill round of `input_tokens`, then
decode rounds) and reports its makespan and per-stage busy share.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class SimResult:
    """Predicted pipeline figures. busy_share[k] = share of the time stage k computes."""

    tokens_per_s: float  # whole workload when simulated, else steady decode rate
    steady_tokens_per_s: float  # decode steady state (closed form)
    sequential_s_per_token: float  # R: one sequence, nothing else in flight
    round_trip_s: float  # R
    bottleneck_s: float  # P
    busy_share: tuple[float, ...]  # per stage
    link_busy_share: tuple[float, ...]  # per hop (the last is the return hop)
    total_s: float | None = None  # makespan of the simulated workload
    generated_tokens: int = 0  # tokens produced by the simulated workload (m * b * G)


def steady_rate(round_trip_s: float, bottleneck_s: float, m: int, barrier: bool) -> float:
    """Micro-batch steps per second in steady decode."""
    if round_trip_s <= 0:
        return float("inf")
    if barrier:
        return m / (round_trip_s + (m - 1) * bottleneck_s)
    return min(m / round_trip_s, 1 / bottleneck_s if bottleneck_s > 0 else float("inf"))


def simulate_pipeline(
    stage_times_s: Sequence[float],
    hop_times_s: Sequence[float],
    m: int = 1,
    b: int = 1,
    barrier: bool = False,
    *,
    input_tokens: int = 0,
    generated_tokens: int | None = None,
    prefill_stage_times_s: Sequence[float] | None = None,
    prefill_hop_times_s: Sequence[float] | None = None,
) -> SimResult:
    """Predict throughput of a pipeline of K stages.

    stage_times_s[k]: time stage k needs for one decode step of one micro-batch (b sequences).
    hop_times_s[k]: time of the hop after stage k; hop_times_s[K-1] is the return hop to the
    source (0 when the last stage is the source). m micro-batches in flight, b sequences each.
    barrier=True waits for every micro-batch to finish token t before any starts token t+1.
    With generated_tokens=G, an event simulation runs 1 prefill round (prefill_* times, default
    the decode times) and G-1 decode rounds per micro-batch; input_tokens is informational for
    callers that derive prefill times from it.
    """
    k = len(stage_times_s)
    if k == 0 or len(hop_times_s) != k:
        raise ValueError("need one hop time per stage (the last is the return hop)")
    if m < 1 or b < 1:
        raise ValueError("m and b must be >= 1")
    stage = [float(x) for x in stage_times_s]
    hop = [float(x) for x in hop_times_s]
    r = sum(stage) + sum(hop)
    p = max(stage + hop)
    rate = steady_rate(r, p, m, barrier)
    steady = b * rate
    if generated_tokens is None:
        return SimResult(
            tokens_per_s=steady, steady_tokens_per_s=steady, sequential_s_per_token=r,
            round_trip_s=r, bottleneck_s=p,
            busy_share=tuple(min(1.0, t * rate) for t in stage),
            link_busy_share=tuple(min(1.0, t * rate) for t in hop),
        )
    pre_stage = [float(x) for x in (prefill_stage_times_s or stage)]
    pre_hop = [float(x) for x in (prefill_hop_times_s or hop)]
    total, busy = _event_sim(stage, hop, pre_stage, pre_hop, m, barrier, generated_tokens)
    produced = m * b * generated_tokens
    return SimResult(
        tokens_per_s=produced / total if total > 0 else float("inf"),
        steady_tokens_per_s=steady, sequential_s_per_token=r, round_trip_s=r, bottleneck_s=p,
        busy_share=tuple(x / total for x in busy[0::2]) if total > 0 else (0.0,) * k,
        link_busy_share=tuple(x / total for x in busy[1::2]) if total > 0 else (0.0,) * k,
        total_s=total, generated_tokens=produced,
    )


def simulate_plan(plan, m: int = 1, b: int = 1, barrier: bool = False, **workload) -> SimResult:
    """simulate_pipeline for a planner Plan: its stage times (compute plus the fixed per-step
    costs, issue 26) and its hops, so the simulator and the planner share one cost model."""
    return simulate_pipeline(plan.stage_s, plan.hop_s, m, b, barrier, **workload)


def _event_sim(stage, hop, pre_stage, pre_hop, m, barrier, rounds):
    """Makespan and per-server busy time; servers alternate stage, hop, stage, hop..."""
    decode = [x for pair in zip(stage, hop) for x in pair]
    prefill = [x for pair in zip(pre_stage, pre_hop) for x in pair]
    n_srv = len(decode)
    free_at = [0.0] * n_srv
    busy = [0.0] * n_srv
    # event: (ready time, job, round, server)
    events = [(0.0, j, 0, 0) for j in range(m)]
    heapq.heapify(events)
    finished_round: list[float] = []
    end = 0.0
    while events:
        ready, job, rnd, srv = heapq.heappop(events)
        dur = (prefill if rnd == 0 else decode)[srv]
        start = max(ready, free_at[srv])
        done = start + dur
        free_at[srv] = done
        busy[srv] += dur
        if srv + 1 < n_srv:
            heapq.heappush(events, (done, job, rnd, srv + 1))
            continue
        end = max(end, done)
        if rnd + 1 >= rounds:
            continue
        if not barrier:
            heapq.heappush(events, (done, job, rnd + 1, 0))
            continue
        finished_round.append(done)
        if len(finished_round) == m:  # the whole round is back: release everyone at once
            t = max(finished_round)
            finished_round = []
            for j in range(m):
                heapq.heappush(events, (t, j, rnd + 1, 0))
    return end, busy
