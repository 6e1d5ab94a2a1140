"""Named strategies: ours, the paper's algorithms and the paper's baselines (section V-A).

- ours: exact (swarm.planner.exact)
- paper-latency / paper-throughput: Algorithms 1 and 2 as stated (swarm.planner.paper)
- edge-solo: everything on the source
- cloud-edge-even: the units split in two halves, source then cloud
- cloud-edge-opt: ours restricted to the source and the cloud device
- even: EdgeShard-Even, the devices ours selects with the units split evenly among them
The cloud device is `cloud=` (index or name) or else the fastest device other than the source.
"""

from __future__ import annotations

from swarm.planner import paper
from swarm.planner.exact import plan_ours
from swarm.planner.plan import Plan, PlannedStage, evaluate
from swarm.planner.problem import InfeasibleError, Problem

STRATEGIES = ("ours", "paper-latency", "paper-throughput", "edge-solo", "cloud-edge-even", "cloud-edge-opt", "even")


class InvalidPlanError(InfeasibleError):
    """A paper algorithm returned a plan that breaks the constraints (kept to show the flaw)."""

    def __init__(self, message: str, problem: Problem, stages: tuple[PlannedStage, ...]):
        super().__init__(message, float(problem.layer_mem.sum()), float(problem.device_mem.sum()),
                         float(problem.device_mem.max()))
        self.stages = stages


def run_strategy(problem: Problem, name: str, objective: str = "latency", inflight: int = 1,
                 cloud: int | str | None = None, devices: list[int] | None = None) -> Plan:
    """The plan of strategy `name`, evaluated with the full cost model (return hop included)."""
    meta = {"objective": objective, "strategy": name}
    if name == "ours":
        return plan_ours(problem, objective, inflight)
    if name in ("paper-latency", "paper-throughput"):
        return _paper(problem, name, inflight, meta)
    if name == "edge-solo":
        return _fixed(problem, [PlannedStage(problem.source, 0, problem.n_units)], inflight, meta)
    if name == "even":
        chosen = devices or [s.device for s in plan_ours(problem, objective, inflight).stages]
        return _fixed(problem, even_split(chosen, problem.n_units), inflight, meta)
    c = cloud_device(problem, cloud)
    if name == "cloud-edge-even":
        return _fixed(problem, even_split([problem.source, c], problem.n_units), inflight, meta)
    if name == "cloud-edge-opt":
        sub, index = restrict(problem, [problem.source, c])
        p = plan_ours(sub, objective, inflight)
        stages = [PlannedStage(index[s.device], s.start, s.end) for s in p.stages]
        return evaluate(problem, stages, inflight, method=p.method, **meta)
    raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")


def even_split(devices: list[int], n_units: int) -> list[PlannedStage]:
    """Units split as evenly as possible over the devices in order (earlier ones take the extra)."""
    k = min(len(devices), n_units)
    base, extra = divmod(n_units, k)
    stages, pos = [], 0
    for i, d in enumerate(devices[:k]):
        size = base + (1 if i < extra else 0)
        stages.append(PlannedStage(d, pos, pos + size))
        pos += size
    return stages


def cloud_device(problem: Problem, cloud: int | str | None) -> int:
    if isinstance(cloud, str):
        if cloud not in problem.device_names:
            raise ValueError(f"cloud device {cloud!r} is not in the problem")
        return problem.device_names.index(cloud)
    if cloud is not None:
        return int(cloud)
    others = [d for d in range(problem.n_devices) if d != problem.source]
    if not others:
        raise ValueError("cloud-edge strategies need a device besides the source")
    return min(others, key=lambda d: float(problem.time[d].sum()))


def restrict(problem: Problem, devices: list[int]) -> tuple[Problem, list[int]]:
    """The problem on a subset of devices (the source first) and the map back to indices."""
    data = problem.to_json()
    data["devices"] = [data["devices"][d] for d in devices]
    data["bandwidth"] = [[problem.bandwidth[a, b] for b in devices] for a in devices]
    data["latency"] = [[problem.latency[a, b] for b in devices] for a in devices]
    data["source"] = devices.index(problem.source)
    return Problem.from_json(data), list(devices)


def _fixed(problem: Problem, stages: list[PlannedStage], inflight: int, meta: dict) -> Plan:
    try:
        return evaluate(problem, stages, inflight, **meta)
    except ValueError as e:
        raise InvalidPlanError(f"{meta['strategy']}: {e}", problem, tuple(stages)) from e


def _paper(problem: Problem, name: str, inflight: int, meta: dict) -> Plan:
    result = paper.algorithm1(problem) if name == "paper-latency" else paper.algorithm2(problem)
    if result is None:
        plan_ours(problem, "latency")  # raises InfeasibleError when no plan exists at all
        raise InvalidPlanError(f"{name} (Algorithm {1 if name == 'paper-latency' else 2} as printed) found no plan "
                               "although one exists: its running per-device memory counter pruned every path",
                               problem, ())
    if result.problems:
        raise InvalidPlanError(f"{name} returned an invalid plan: " + "; ".join(result.problems), problem,
                               result.stages)
    notes = (f"{name}: the algorithm's own value {result.value:.6g} s",)
    if name == "paper-throughput":
        notes += ("paper-throughput ignores the hop returning the token to the source; "
                  "the figures here include it",)
    if name == "paper-latency":
        meta = {**meta, "objective": "latency"}
    else:
        meta = {**meta, "objective": "throughput"}
    return evaluate(problem, result.stages, inflight, notes=notes, **meta)
