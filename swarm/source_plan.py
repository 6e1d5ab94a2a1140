"""A plan over the live swarm: the problem it solved, the planner's answer, and where each
of the problem's devices is (what SwarmSource deploys and re-plans from)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from swarm.planner.plan import Plan
from swarm.runtime.deploy import StagePlacement


@dataclass(frozen=True)
class SourcePlan:
    """A plan over the live swarm. Its one tuple of stages is the planner's (``plan.stages``,
    by device index); ``stages`` gives them in the runtime's terms through ``addresses``."""

    problem: dict
    plan: Plan
    addresses: tuple[str | None, ...]  # per device of the problem: its control address; None = this source

    @classmethod
    def build(cls, problem: dict, plan: Plan, address_of: Mapping[str, str]) -> SourcePlan:
        """``problem``: the JSON it solved (its device 0 is this source); ``address_of``: peer
        id -> "tcp://host:port" of each live peer."""
        return cls(problem, plan, (None, *(address_of.get(i) for i in problem["peer_ids"][1:])))

    @property
    def stages(self) -> tuple[StagePlacement, ...]:
        """The plan's stages in the runtime's terms (address None = this process)."""
        return tuple(StagePlacement(self.addresses[s.device], s.start, s.end) for s in self.plan.stages)

    @property
    def peer_ids(self) -> frozenset[str]:
        """The live peers the problem was built from."""
        return frozenset(self.problem["peer_ids"][1:])

    def describe(self) -> list[str]:
        names = [d["name"] for d in self.problem["devices"]]
        return [f"{names[s.device]}: units [{s.start}, {s.end})" for s in self.plan.stages]

    def names_by_address(self) -> dict[str, str]:
        """Peer name of every remote stage's address."""
        names = [d["name"] for d in self.problem["devices"]]
        return {self.addresses[s.device]: names[s.device] for s in self.plan.stages if s.device}

    def peer_ids_by_address(self) -> dict[str, str]:
        ids = self.problem["peer_ids"]
        return {self.addresses[s.device]: ids[s.device] for s in self.plan.stages if s.device}
