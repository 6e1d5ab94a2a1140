"""A plan (ordered stages) and its cost under the issue-3 model, extended by issue 26.

A stage's time = its units' compute + its device's fixed per-step costs (the step
constant always; the hop overhead when the plan has two or more stages).
R (latency) = stage times + hops between stages + the return hop.
P (bottleneck) = the largest stage time or hop, the return hop included.
cycle with m micro-batches in flight = max(R / m, P).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from swarm.planner.problem import Problem


@dataclass(frozen=True)
class PlannedStage:
    """One device running units [start, end)."""

    device: int
    start: int
    end: int


@dataclass(frozen=True)
class Plan:
    """Stages plus the predicted figures. hop_s[k] is the hop after stage k (the last is the return)."""

    stages: tuple[PlannedStage, ...]
    latency_s: float
    bottleneck_s: float
    cycle_s: float
    inflight: int
    compute_s: tuple[float, ...]
    hop_s: tuple[float, ...]
    mem_used: tuple[float, ...]
    objective: str = "latency"
    strategy: str = "ours"
    method: str = ""
    gap: float = 0.0  # relative gap to a proven bound; 0 when exact
    notes: tuple[str, ...] = field(default=())
    overhead_s: tuple[float, ...] = ()  # per stage: fixed per-step costs (step constant, hop overhead)

    @property
    def stage_s(self) -> tuple[float, ...]:
        """Per stage: the time it is occupied per step (compute + fixed costs): what the simulator takes."""
        if not self.overhead_s:
            return self.compute_s
        return tuple(c + o for c, o in zip(self.compute_s, self.overhead_s))

    def to_json(self, problem: Problem | None = None) -> dict[str, Any]:
        """The plan as JSON: stages (with names and figures when the problem is given) and totals."""
        stages = []
        for k, st in enumerate(self.stages):
            d: dict[str, Any] = {"device": st.device, "start": st.start, "end": st.end,
                                 "compute_s": self.compute_s[k], "hop_s": self.hop_s[k],
                                 "overhead_s": self.overhead_s[k] if self.overhead_s else 0.0,
                                 "mem_used": self.mem_used[k]}
            if problem is not None:
                d["name"] = problem.device_names[st.device]
                d["mem_available"] = float(problem.device_mem[st.device])
            stages.append(d)
        return {"stages": stages, "latency_s": self.latency_s, "bottleneck_s": self.bottleneck_s,
                "cycle_s": self.cycle_s, "inflight": self.inflight, "objective": self.objective,
                "strategy": self.strategy, "method": self.method, "gap": self.gap, "notes": list(self.notes)}


def check_stages(problem: Problem, stages: Sequence[PlannedStage]) -> None:
    """Raise ValueError unless the stages form a valid plan (memory and links included)."""
    if not stages:
        raise ValueError("a plan needs at least one stage")
    if stages[0].device != problem.source or stages[0].start != 0:
        raise ValueError("the first stage must be the source starting at unit 0")
    devices = [s.device for s in stages]
    if len(set(devices)) != len(devices):
        raise ValueError("a device appears in two stages")
    pos = 0
    mem = problem.prefix_mem()
    for s in stages:
        if s.start != pos or s.end <= s.start:
            raise ValueError(f"stage {s} does not continue at unit {pos} with a non-empty range")
        if mem[s.end] - mem[s.start] > problem.device_mem[s.device] * (1 + 1e-12):
            raise ValueError(f"stage {s} exceeds the memory of {problem.device_names[s.device]}")
        pos = s.end
    if pos != problem.n_units:
        raise ValueError(f"the stages end at unit {pos}, not {problem.n_units}")


def evaluate(problem: Problem, stages: Sequence[PlannedStage], inflight: int = 1, **meta: Any) -> Plan:
    """Check the stages and compute R, P and the cycle time; meta fills objective/strategy/notes."""
    stages = tuple(stages)
    check_stages(problem, stages)
    pt = problem.prefix_time()
    mem = problem.prefix_mem()
    hops = problem.cut_hops()
    ret = problem.return_time()
    compute = tuple(float(pt[s.device, s.end] - pt[s.device, s.start]) for s in stages)
    fixed = problem.stage_overhead() if len(stages) > 1 else problem.step_overhead
    overhead = tuple(float(fixed[s.device]) for s in stages)
    hop = [float(hops[b.start, a.device, b.device]) for a, b in zip(stages, stages[1:])]
    hop.append(float(ret[stages[-1].device]))
    if not all(map(math.isfinite, hop)):
        raise ValueError("the plan uses a missing link (bandwidth 0)")
    stage = [c + o for c, o in zip(compute, overhead)]
    latency = sum(stage) + sum(hop)
    bottleneck = max(max(stage), max(hop))
    return Plan(
        stages=stages,
        latency_s=latency,
        bottleneck_s=bottleneck,
        cycle_s=max(latency / inflight, bottleneck),
        inflight=inflight,
        compute_s=compute,
        hop_s=tuple(hop),
        overhead_s=overhead,
        mem_used=tuple(float(mem[s.end] - mem[s.start]) for s in stages),
        **meta,
    )
