"""SourcePlan: the planner's stages, by device, in the runtime's terms (pure)."""

from __future__ import annotations

from swarm.planner.plan import Plan, PlannedStage
from swarm.runtime.deploy import StagePlacement
from swarm.source_plan import SourcePlan


def test_the_planners_stages_are_the_one_tuple_and_the_runtime_reads_them_by_address():
    problem = {"peer_ids": ["src", "p1", "p2", "p3"],
               "devices": [{"name": "source"}, {"name": "a"}, {"name": "b"}, {"name": "c"}]}
    stages = (PlannedStage(0, 0, 1), PlannedStage(3, 1, 4), PlannedStage(1, 4, 6))
    plan = Plan(stages, 1.0, 0.5, 1.0, 1, (0.1, 0.2, 0.3), (0.0, 0.01, 0.01), (1.0, 2.0, 3.0))
    sp = SourcePlan.build(problem, plan, {"p1": "tcp://h:1", "p2": "tcp://h:2", "p3": "tcp://h:3"})
    assert sp.stages == (StagePlacement(None, 0, 1), StagePlacement("tcp://h:3", 1, 4), StagePlacement("tcp://h:1", 4, 6))
    assert sp.peer_ids == frozenset({"p1", "p2", "p3"})  # p2 holds no stage: the plan was still made over it
    assert sp.names_by_address() == {"tcp://h:3": "c", "tcp://h:1": "a"}
    assert sp.peer_ids_by_address() == {"tcp://h:3": "p3", "tcp://h:1": "p1"}
    assert sp.describe() == ["source: units [0, 1)", "c: units [1, 4)", "a: units [4, 6)"]
