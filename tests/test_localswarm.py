"""`--local N`: memory budgets that force a split, and peers that never outlive the chat."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from swarm.discovery.problem import Device, Workload, build_problem
from swarm.localswarm import LocalSwarm, LocalSwarmConfig, LocalSwarmError, local_budgets, unit_memory
from swarm.planner.api import plan as plan_problem
from swarm.planner.problem import InfeasibleError, Problem


def problem_for(unit_mem: list[int], budgets, peers: int) -> Problem:
    """Every device equally fast, every link the same: only memory decides the split."""
    units = [{"name": f"u{i}", "weight_bytes": m, "kv_bytes_per_token": 0, "out_bytes_per_token": 256,
              "time_s": 0.001} for i, m in enumerate(unit_mem)]
    devices = [Device("source", "source", budgets.source, (0.001,) * len(units))]
    devices += [Device(f"p{i}", f"local-{i + 1}", budgets.peer, (0.001,) * len(units)) for i in range(peers)]
    data = build_problem({"units": units}, devices, {}, Workload())
    m = len(devices)
    data["bandwidth"] = [[0 if i == j else 1e9 for j in range(m)] for i in range(m)]
    data["latency"] = [[0 if i == j else 1e-4 for j in range(m)] for i in range(m)]
    return Problem.from_json(data)


@pytest.mark.parametrize("peers", [1, 2, 3, 4])
def test_budgets_make_the_plan_split_the_model(tiny_model_dir, peers):
    unit_mem = unit_memory(tiny_model_dir, slots=1, max_len=512)
    budgets = local_budgets(unit_mem, peers)
    assert budgets.source < unit_mem[0] + min(unit_mem[1:])  # the source holds the embedding only
    if peers >= 2:
        assert budgets.peer < sum(unit_mem[1:])  # no peer can hold the rest alone
    plan = plan_problem(problem_for(unit_mem, budgets, peers), objective="latency")
    assert plan.stages[0].device == 0 and (plan.stages[0].start, plan.stages[0].end) == (0, 1)
    # With one or two peers every peer is needed; with more, at least two of them.
    assert len(plan.stages) >= min(peers, 2) + 1


def test_three_or_more_peers_can_lose_one(tiny_model_dir):
    unit_mem = unit_memory(tiny_model_dir, slots=1, max_len=512)
    budgets = local_budgets(unit_mem, 3)
    assert plan_problem(problem_for(unit_mem, budgets, 2), objective="latency")
    with pytest.raises(InfeasibleError):
        plan_problem(problem_for(unit_mem, budgets, 1), objective="latency")


def test_one_peer_fewer_does_not_fit(tiny_model_dir):
    unit_mem = unit_memory(tiny_model_dir, slots=1, max_len=512)
    budgets = local_budgets(unit_mem, 2)
    with pytest.raises(InfeasibleError):
        plan_problem(problem_for(unit_mem, budgets, 1), objective="latency")


def test_budgets_reject_zero_peers():
    with pytest.raises(ValueError):
        local_budgets([10, 10, 10], 0)


# A parent that starts a local swarm of one peer, prints the peers, then waits to be killed.
PARENT = """
import asyncio, json, sys
from pathlib import Path
from swarm.localswarm import LocalSwarm, LocalSwarmConfig
async def main():
    async with LocalSwarm(LocalSwarmConfig(1, 1 << 30, Path(sys.argv[1]), extra_args=("--heartbeat", "0.2"))) as s:
        print(json.dumps([p.pid for p in s.peers]), flush=True)
        await asyncio.sleep(600)
asyncio.run(main())
"""


def wait_gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return alive


@pytest.mark.slow
async def test_peers_join_and_stop_with_the_block(tiny_model_dir):
    ready = []
    config = LocalSwarmConfig(2, 1 << 30, tiny_model_dir, extra_args=("--heartbeat", "0.2"))
    async with LocalSwarm(config, on_ready=lambda done, total, name: ready.append((done, total))) as swarm:
        assert sorted(p.name for p in swarm.peers) == ["local-1", "local-2"]
        assert all(p.address.startswith("tcp://127.0.0.1:") for p in swarm.peers)
        assert ready == [(1, 2), (2, 2)]
        pids = [p.pid for p in swarm.peers]
        assert all(psutil.pid_exists(p) for p in pids)
        # Each peer runs in its own session: a Ctrl-C in the chat's terminal never reaches it.
        assert all(os.getsid(p) == p for p in pids)
    assert wait_gone(pids, timeout=1.0) == []
    await swarm.close()  # idempotent


@pytest.mark.slow
async def test_a_peer_that_cannot_start_is_named_with_the_end_of_its_log(tiny_model_dir, tmp_path):
    config = LocalSwarmConfig(2, 1 << 30, tiny_model_dir, log_dir=tmp_path, extra_args=("--no-such-option",))
    with pytest.raises(LocalSwarmError, match=r"(?s)local peer \d exited with status 2 before joining.*--no-such-option"):
        async with LocalSwarm(config):
            pass


@pytest.mark.slow
def test_peers_die_with_a_killed_parent(tiny_model_dir):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tiny_model_dir)], stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(parent.stdout.readline())
        assert len(pids) == 1 and psutil.pid_exists(pids[0])
        parent.send_signal(signal.SIGKILL)  # no cleanup code runs in the parent
        parent.wait()
        assert wait_gone(pids) == []
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
