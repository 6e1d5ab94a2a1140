"""A plan over the live swarm: the problem it solved, the planner's answer, and its stages
in the runtime's terms (what SwarmSource deploys and re-plans from)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from swarm.planner.plan import Plan
from swarm.runtime.deploy import StagePlacement


@dataclass(frozen=True)
class SourcePlan:
    """A plan over the live swarm: the problem it solved, the planner's answer, and the
    stages in the runtime's terms (address None = this process)."""

    problem: dict
    plan: Plan
    stages: tuple[StagePlacement, ...]  # the plan's stages in the runtime's terms, address None = here
    peer_ids: frozenset[str]  # the live peers the problem was built from

    @classmethod
    def build(cls, problem: dict, plan: Plan, address_of: Mapping[str, str]) -> SourcePlan:
        """The plan's stages in the runtime's terms. ``problem``: the JSON it solved (its
        device 0 is this source); ``address_of``: peer id -> "tcp://host:port" of each live peer."""
        ids = problem["peer_ids"]
        stages = tuple(StagePlacement(None if s.device == 0 else address_of[ids[s.device]], s.start, s.end)
                       for s in plan.stages)
        return cls(problem, plan, stages, frozenset(ids[1:]))

    def describe(self) -> list[str]:
        names = [d["name"] for d in self.problem["devices"]]
        return [f"{names[s.device]}: units [{s.start}, {s.end})" for s in self.plan.stages]

    def names_by_address(self) -> dict[str, str]:
        """Peer name of every remote stage's address."""
        names = [d["name"] for d in self.problem["devices"]]
        return {stage.address: names[s.device] for stage, s in zip(self.stages, self.plan.stages) if stage.address}

    def peer_ids_by_address(self) -> dict[str, str]:
        ids = self.problem["peer_ids"]
        return {stage.address: ids[s.device] for stage, s in zip(self.stages, self.plan.stages) if stage.address}
