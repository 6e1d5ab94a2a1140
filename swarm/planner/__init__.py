"""swarm/planner: joint device selection and partition. Pure: no torch, no zmq.

    problem = Problem.from_json(json.load(f))
    best = plan(problem, objective="cycle", inflight=8)   # -> Plan(stages, latency_s, ...)
    sim = simulate_pipeline(stage_times_s, hop_times_s, m=8, b=1, barrier=False)
    sim = simulate_plan(best, m=8)                        # the plan's stage (compute + fixed costs) and hop times
"""

from swarm.planner.api import plan
from swarm.planner.plan import Plan, PlannedStage, evaluate
from swarm.planner.problem import InfeasibleError, Problem, ProblemError
from swarm.planner.simulate import SimResult, simulate_pipeline, simulate_plan

__all__ = ["InfeasibleError", "Plan", "Problem", "ProblemError", "SimResult", "PlannedStage", "evaluate", "plan",
           "simulate_pipeline", "simulate_plan"]
