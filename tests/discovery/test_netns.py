"""Peers in network namespaces on one bridge, links shaped with `tc tbf`: the measured
bandwidths match the shaping and the plan follows a slowed link as the planner says."""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.discovery import fixture_profile, stop_processes
from tests.helpers.requirements import require
from swarm.planner.api import plan as plan_problem
from swarm.planner.problem import Problem

pytestmark = [pytest.mark.netns, pytest.mark.slow]

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
MBIT = 1e6 / 8  # bytes per second
TOLERANCE = 0.15
PROBE_INTERVAL_S = 3.0  # a slowed link shows once the probes' last few figures are all new
TIMEOUT_S = 90
# source, fast peer A, slower peer B; uploads shaped on each namespace's side of its veth
UPLOAD_MBIT = {"src": 50, "a": 50, "b": 10}
SLOW_MBIT = 10  # later, A's download (the hub side of its veth) is slowed to this
HIDDEN = 16384  # 64 KiB per token across a cut: links matter as much as compute


def _can_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "needs iproute2 (ip, tc)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True)
    return None if probe.returncode == 0 else "ip netns is not available here"


TESTBED = REPO / "bootstrap" / "netns" / "testbed.sh"


def _testbed(*args: str) -> str:
    return subprocess.run([str(TESTBED), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def testbed():
    """Namespaces <tag>-hub (a bridge) and <tag>-src/-a/-b on 10.77.0.x; removed afterwards."""
    require(_can_netns())
    tag = f"swt{os.getpid() % 100000}"
    try:
        lines = _testbed("up", tag, *(f"{name}:{mbit}" for name, mbit in UPLOAD_MBIT.items())).split("\n")
        rows = [line.split() for line in lines if line.strip()]
        yield {"tag": tag, "spaces": {name: ns for name, ns, _ in rows}, "ips": {name: ip for name, _, ip in rows}}
    finally:
        _testbed("down", tag)


def _profiles() -> dict[str, dict]:
    # the source computes slowly, A fast, B in between: offloading pays only over a fast link
    speeds = {"src": 0.03, "a": 0.001, "b": 0.002}
    return {n: fixture_profile(block_decode_s=s, hidden=HIDDEN, name=n) for n, s in speeds.items()}


def _start(ns: str, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *args], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})


def _line(proc: subprocess.Popen, timeout: float = TIMEOUT_S) -> dict:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no answer from the process in the namespace"
    return json.loads(proc.stdout.readline())


@pytest.fixture(scope="module")
def swarm_in_namespaces(testbed, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("netns")
    paths = {}
    for name, profile in _profiles().items():
        paths[name] = tmp / f"{name}.json"
        paths[name].write_text(json.dumps(profile))
    procs = []
    try:
        ids = {}
        for name in ("a", "b"):
            proc = _start(testbed["spaces"][name], [
                "-m", "swarm", "join", "--interface", testbed["ips"][name], "--name", name,
                "--profile", str(paths[name]), "--heartbeat", "0.5", "--probe-interval", str(PROBE_INTERVAL_S)])
            procs.append(proc)
            ids[_line(proc)["joined"]] = name
        source = _start(testbed["spaces"]["src"], [
            str(Path(__file__).with_name("netns_source.py")), testbed["ips"]["src"], str(paths["src"]), "2",
            str(PROBE_INTERVAL_S)])
        procs.append(source)
        ids[_line(source)["ready"]] = "src"
        yield source, ids
    finally:
        stop_processes(procs)


def _expected(names: list[str], slowed: bool) -> list[list[float]]:
    def rate(u: str, v: str) -> float:
        down = SLOW_MBIT if (slowed and v == "a") else float("inf")
        return min(UPLOAD_MBIT[u], down) * MBIT
    return [[0.0 if u == v else rate(u, v) for v in names] for u in names]


def _within(measured, expected) -> bool:
    return all(abs(m - e) <= TOLERANCE * e for row_m, row_e in zip(measured, expected)
               for m, e in zip(row_m, row_e) if e)


def _plan_until(source, ids, slowed: bool) -> tuple[dict, dict, list[str]]:
    """Ask the source to plan until its measured links match the shaping (probes refresh)."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        source.stdin.write("plan\n")
        source.stdin.flush()
        out = _line(source)
        names = [ids[pid] for pid in out["problem"]["peer_ids"]]
        log.info("measured Mbit/s %s: %s", names, [[round(b * 8 / 1e6, 1) for b in row] for row in out["problem"]["bandwidth"]])
        if _within(out["problem"]["bandwidth"], _expected(names, slowed)) or time.monotonic() > deadline:
            return out["problem"], out["plan"], names
        time.sleep(0.5)  # between polls of a probe that refreshes every PROBE_INTERVAL_S


def _stage_names(plan: dict, names: list[str]) -> list[tuple[str, int, int]]:
    return [(names[s["device"]], s["start"], s["end"]) for s in plan["stages"]]


def test_measured_bandwidth_matches_tbf_and_plan_follows_a_slowed_link(testbed, swarm_in_namespaces):
    source, ids = swarm_in_namespaces
    problem, plan, names = _plan_until(source, ids, slowed=False)
    assert sorted(names) == ["a", "b", "src"]
    expected = _expected(names, slowed=False)
    for i, u in enumerate(names):
        for j, v in enumerate(names):
            if i != j:
                assert abs(problem["bandwidth"][i][j] - expected[i][j]) <= TOLERANCE * expected[i][j], (u, v)
    before = _stage_names(plan, names)
    assert before == _stage_names(plan_problem(Problem.from_json(problem)).to_json(), names)
    assert [s[0] for s in before] == ["src", "a"]  # the fast peer, reached over a fast link

    # Slow what reaches A (its download, on the hub side) to SLOW_MBIT.
    _testbed("shape", testbed["tag"], "a", str(SLOW_MBIT), "down")
    problem2, plan2, names2 = _plan_until(source, ids, slowed=True)
    assert _within(problem2["bandwidth"], _expected(names2, slowed=True)), problem2["bandwidth"]
    after = _stage_names(plan2, names2)
    log.info("plan before %s, after slowing A: %s", before, after)
    # What the planner says for the shaped figures themselves, not only for what was measured:
    shaped = dict(problem2, bandwidth=_expected(names2, slowed=True))
    assert after == _stage_names(plan_problem(Problem.from_json(shaped)).to_json(), names2)
    assert after != before and [s[0] for s in after] == ["src", "b"]
