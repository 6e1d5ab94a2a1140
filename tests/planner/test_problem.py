"""Loading, validation messages, infeasibility figures, plan cost model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from swarm.planner import InfeasibleError, Problem, ProblemError, PlannedStage, evaluate, plan


def small(**over):
    data = {
        "source": 0,
        "layers": [{"name": "embed", "mem": 2, "out": 10}, {"name": "b0", "mem": 4, "out": 10},
                   {"name": "head", "mem": 2, "out": 100}],
        "devices": [{"name": "a", "mem": 6, "time": [1, 4, 2]}, {"name": "b", "mem": 8, "time": [1, 1, 1]}],
        "bandwidth": [[0, 10], [5, 0]],
        "latency": [[0, 0.5], [0.25, 0]],
        "return_bytes": 5,
    }
    data.update(over)
    return data


@pytest.mark.parametrize("patch, field", [
    ({"layers": [{"name": "x", "out": 1}]}, "layers[0].mem"),
    ({"devices": [{"name": "a", "mem": 6, "time": [1, 4]}, {"name": "b", "mem": 8, "time": [1, 1, 1]}]},
     "devices[0].time"),
    ({"devices": [{"name": "a", "mem": -1, "time": [1, 4, 2]}, {"name": "b", "mem": 8, "time": [1, 1, 1]}]},
     "devices[0].mem"),
    ({"bandwidth": [[0, 10]]}, "bandwidth"),
    ({"bandwidth": [[0, 10], [5, "x"]]}, "bandwidth[1][1]"),
    ({"source": 2}, "source"),
    ({"latency": [[0, 0], [0]]}, "latency[1]"),
])
def test_malformed_problem_names_the_field(patch, field):
    with pytest.raises(ProblemError) as e:
        Problem.from_json(small(**patch))
    assert str(e.value).startswith(field + ":")


def test_cost_model_by_hand():
    p = Problem.from_json(small())
    got = evaluate(p, [PlannedStage(0, 0, 1), PlannedStage(1, 1, 3)], inflight=2)
    hop = 0.5 + 10 / 10  # a -> b carries out[0] = 10 B at 10 B/s plus 0.5 s latency
    ret = 0.25 + 5 / 5  # b -> a returns 5 B at 5 B/s plus 0.25 s
    assert got.compute_s == (1, 2) and got.hop_s == (hop, ret)
    assert got.latency_s == 1 + hop + 2 + ret
    assert got.bottleneck_s == 2
    assert got.cycle_s == max((1 + hop + 2 + ret) / 2, 2)
    assert plan(p, "latency").latency_s == 1 + hop + 2 + ret  # a alone cannot hold all 8 B


def test_fixed_costs_by_hand_and_old_problems_have_none():
    """Issue 26: a stage pays its device's step constant always and its hop overhead in a
    multi-stage plan; both occupy the stage (they count in P), and JSON without them reads as 0."""
    assert Problem.from_json(small()).hop_overhead.tolist() == [0, 0]
    devices = [{"name": "a", "mem": 6, "time": [1, 4, 2], "step_overhead": 0.1, "hop_overhead": 0.3},
               {"name": "b", "mem": 8, "time": [1, 1, 1], "step_overhead": 0.2, "hop_overhead": 1.5}]
    p = Problem.from_json(small(devices=devices))
    assert Problem.from_json(json.loads(json.dumps(p.to_json()))).hop_overhead.tolist() == [0.3, 1.5]
    got = evaluate(p, [PlannedStage(0, 0, 1), PlannedStage(1, 1, 3)], inflight=2)
    hop, ret = 0.5 + 10 / 10, 0.25 + 5 / 5
    assert got.compute_s == (1, 2) and got.overhead_s == (0.1 + 0.3, 0.2 + 1.5)
    assert got.stage_s == (1.4, 3.7)
    assert got.latency_s == pytest.approx(1.4 + hop + 3.7 + ret)
    assert got.bottleneck_s == pytest.approx(3.7)  # stage b with its overheads, above any hop
    # b can hold everything when it is the source: its one-stage plan pays only its step constant
    solo = small(devices=devices, source=1)
    q = Problem.from_json(solo)
    one = evaluate(q, [PlannedStage(1, 0, 3)])
    assert one.latency_s == pytest.approx(3 + 0.2) and one.overhead_s == (0.2,)


def test_hop_overhead_changes_the_best_plan():
    """Two equal devices on a free link: splitting halves the compute per stage, so the
    throughput plan splits; a hop overhead larger than the saving keeps everything on one."""
    def problem(overhead: float) -> Problem:
        dev = lambda name: {"name": name, "mem": 100, "time": [1, 4, 4, 1], "hop_overhead": overhead}  # noqa: E731
        return Problem.from_json({
            "source": 0, "layers": [{"name": f"u{i}", "mem": 1, "out": 1} for i in range(4)],
            "devices": [dev("a"), dev("b")], "bandwidth": [[0, 1e9], [1e9, 0]], "return_bytes": 1})
    assert len(plan(problem(0.0), "throughput").stages) == 2  # P = 5 instead of 10
    assert len(plan(problem(6.0), "throughput").stages) == 1  # a split stage would take 5 + 6 > 10
    assert plan(problem(6.0), "throughput").bottleneck_s == 10


def test_infeasible_error_gives_memory_figures():
    data = small(devices=[{"name": "a", "mem": 3, "time": [1, 1, 1]}, {"name": "b", "mem": 3, "time": [1, 1, 1]}])
    with pytest.raises(InfeasibleError) as e:
        plan(Problem.from_json(data))
    assert (e.value.needed_bytes, e.value.available_bytes) == (8, 6)
    assert "needs 8 B but all 2 devices together have 6 B" in str(e.value)


def test_missing_link_makes_a_problem_infeasible_and_says_so():
    p = Problem.from_json(small(bandwidth=[[0, 0], [5, 0]]))
    with pytest.raises(InfeasibleError, match="no chain of linked devices"):
        plan(p, "throughput")


def test_cli_plan_json_and_errors(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(small()))
    cmd = [sys.executable, "-m", "swarm", "plan", str(f), "--objective", "cycle", "--inflight", "2", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    res = json.loads(out.stdout)
    assert [(s["device"], s["start"], s["end"]) for s in res["stages"]] == [(0, 0, 1), (1, 1, 3)]
    assert res["latency_s"] == pytest.approx(1 + 1.5 + 2 + 1.25) and res["bottleneck_s"] == 2
    table = subprocess.run(cmd[:-1], capture_output=True, text=True, check=True).stdout
    assert "latency R = 5750.00 ms/token" in table
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(small(source=7)))
    err = subprocess.run(cmd[:4] + [str(bad)], capture_output=True, text=True)
    assert err.returncode == 2 and "source: expected a device index" in err.stderr


def test_planner_imports_neither_torch_nor_zmq_nor_transformers():
    code = ("import sys, swarm.planner, swarm.planner.strategies, swarm.planner.paper, swarm.planner.roofline, "
            "swarm.planner.batching; print(sorted(m for m in ('torch', 'zmq', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
