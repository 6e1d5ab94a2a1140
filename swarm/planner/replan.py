"""Re-plan when the links moved: a pure decision between requests.

The deployed plan was made for the bandwidths and round trips measured then. When the
links measured now differ, the question is not "did a number change" (probes are
noisy) but "is another plan now clearly better". Two gates keep it cheap and stable:

1. some link's hop time for the model's activation moved by at least ``min_change``
   (relative), else nothing is planned at all;
2. the best plan for the new links beats the deployed plan, costed on the same new
   links, by at least ``min_gain`` (relative) and ``min_gain_s`` (absolute) in the
   objective, or the deployed plan now uses a link that no longer exists.

Costing the deployed plan on the new links (rather than comparing with what was
predicted when it was made) is what makes this a decision about plans, not figures.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from swarm.planner.plan import Plan, PlannedStage, evaluate
from swarm.planner.problem import InfeasibleError, Problem

MIN_LINK_CHANGE = 0.25  # relative change of a hop time before the plan is reconsidered
MIN_GAIN = 0.05  # relative improvement a new plan must promise to be worth redeploying
# ...and in absolute terms: a redeploy reloads shards (about a second), which a gain under
# 2 ms per token does not pay back within a typical answer; it also keeps round-trip noise
# on a fast network (tenths of a ms) from swapping between near-equal plans.
MIN_GAIN_S = 0.002
PROFILE_DRIFT = 0.2  # live step times this far (relative) from the plan's say a profile is off (issue 26)


@dataclass(frozen=True)
class ReplanDecision:
    replan: bool
    reason: str
    deployed_s: float  # the deployed plan's objective on the new links (inf: no longer valid)
    best_s: float  # the best plan's objective on the new links
    best: Plan | None = None


def objective_value(plan: Plan, objective: str) -> float:
    return {"latency": plan.latency_s, "throughput": plan.bottleneck_s, "cycle": plan.cycle_s}[objective]


def hop_change(old: Problem, bandwidth: np.ndarray, latency: np.ndarray) -> float:
    """Largest relative change of a link's hop time for the widest activation (a link that
    appeared or vanished counts as infinite)."""
    payload = float(old.layer_out.max())
    new = replace(old, bandwidth=np.asarray(bandwidth, float), latency=np.asarray(latency, float))
    before, after = old.hop_time(payload), new.hop_time(payload)
    off = ~np.eye(old.n_devices, dtype=bool)
    b, a = before[off], after[off]
    both = np.isfinite(b) & np.isfinite(a)
    if (np.isfinite(b) != np.isfinite(a)).any():
        return float("inf")
    if not both.any():
        return 0.0
    return float(np.max(np.abs(a[both] - b[both]) / np.maximum(b[both], 1e-12)))


def decide(problem: Problem, deployed: Sequence[PlannedStage], bandwidth, latency, objective: str = "latency",
           inflight: int = 1, min_change: float = MIN_LINK_CHANGE, min_gain: float = MIN_GAIN,
           min_gain_s: float = MIN_GAIN_S) -> ReplanDecision:
    """Should the source re-plan, now that the links measure ``bandwidth`` [M][M] bytes/s and
    ``latency`` [M][M] s (same device order as ``problem``, the one the deployed plan was made for)?"""
    from swarm.planner.exact import plan_ours

    change = hop_change(problem, np.asarray(bandwidth, float), np.asarray(latency, float))
    if change < min_change:
        return ReplanDecision(False, f"links within {min_change:.0%} (largest hop change {change:.0%})", 0.0, 0.0)
    new = replace(problem, bandwidth=np.asarray(bandwidth, float), latency=np.asarray(latency, float))
    try:
        current = objective_value(evaluate(new, deployed, inflight), objective)
    except ValueError:  # a link the plan uses is gone
        current = float("inf")
    try:
        best = plan_ours(new, objective, inflight)
    except InfeasibleError as exc:
        return ReplanDecision(False, f"no plan fits the new links: {exc}", current, float("inf"))
    value = objective_value(best, objective)
    if tuple(best.stages) == tuple(deployed):
        return ReplanDecision(False, "links moved, the deployed plan is still the best", current, value, best)
    if value < current * (1 - min_gain) and current - value >= min_gain_s:
        return ReplanDecision(True, f"links moved ({change:.0%}): a new plan is {current / value:.2f}x better "
                                    f"({current * 1e3:.1f} -> {value * 1e3:.1f} ms)", current, value, best)
    return ReplanDecision(False, f"links moved ({change:.0%}), but the best plan gains under {min_gain:.0%} "
                                 f"or {min_gain_s * 1e3:g} ms",
                          current, value, best)


def profile_drift(predicted_step_s: Sequence[float], measured_step_s: Sequence[float | None],
                  limit: float = PROFILE_DRIFT) -> list[tuple[int, float, float]]:
    """(stage, predicted, measured) for each stage whose measured compute per decode step
    differs from the plan's by more than ``limit`` (relative); None: not measured yet.

    A profile taken while the device was busy (or before its kernels changed) shows here
    first: the source says which peer's figures are off instead of trusting them silently."""
    return [(k, p, m) for k, (p, m) in enumerate(zip(predicted_step_s, measured_step_s))
            if m is not None and p > 0 and abs(m - p) > limit * p]
