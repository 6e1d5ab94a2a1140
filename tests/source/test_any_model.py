"""`swarm join` without --model offers its memory for any model: a source of another model
plans with it, and the units it is given travel from the source into its own cache."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys

import pytest

from swarm.discovery.liveness import LivenessConfig
from swarm.discovery.links import ProbeConfig
from swarm.discovery.problem import device_for_model
from swarm.discovery.txt import decode, encode, from_profile
from swarm.model.local import LocalChain, generate
from swarm.model.store import weights_fingerprint
from swarm.model.unitfiles import holds_units, units_dir
from swarm.model.units import ModelLayout
from swarm.planner.api import plan as plan_problem
from swarm.planner.problem import Problem
from swarm.source import SourceConfig, SwarmSource
from tests.helpers.discovery import fixture_profile, stop_processes

HEARTBEAT_S = 0.3
PROMPTS = [[1, 17, 42, 99, 7], [1, 5]]
NEW_TOKENS = 10


def test_an_open_peers_times_are_scaled_to_the_models_unit_bytes():
    peer = fixture_profile(block_decode_s=0.002)  # its own model: ~1 MB blocks
    model = fixture_profile()
    for u, size in zip(model["units"], [4e6, 8e6, 8e6, 8e6, 8e6, 4e6]):
        u["weight_bytes"] = int(size)
    device = device_for_model(peer, model, "p", "open", 1 << 30)
    blocks = peer["units"][1:-1]
    weight = sum(u["weight_bytes"] for u in blocks)
    for times, key in ((device.times, "decode_s"), (device.prefill_times, "prefill_s")):  # decode: what R sums
        per_byte = sum(u[key] for u in blocks) / weight
        assert times == pytest.approx([per_byte * u["weight_bytes"] for u in model["units"]])
    assert device.times[1] == pytest.approx(2 * device.times[0])  # twice the bytes, twice the time
    assert device.mem_bytes == 1 << 30


def test_the_announcement_says_a_peer_is_open():
    a = from_profile(fixture_profile(), "p1", "open", open=True)
    assert decode(encode(a, b"k" * 32), b"k" * 32).open
    assert not decode(encode(from_profile(fixture_profile(), "p2", "fixed"), b"k" * 32), b"k" * 32).open


def _join_open(profile_path, name: str, cache, block_decode_s: float = 0.001) -> subprocess.Popen:
    """`swarm join` without --model: the source's file is on this machine, but is not read in place."""
    profile_path.write_text(json.dumps(fixture_profile(name=name, block_decode_s=block_decode_s)))
    return subprocess.Popen(
        [sys.executable, "-m", "swarm", "join", "--interface", "127.0.0.1", "--name", name, "--profile",
         str(profile_path), "--heartbeat", str(HEARTBEAT_S), "--probe-interval", "60",
         # Both peers' hops cost the same: their measured costs differ by more than B's gain.
         "--hop-overhead", "0.0001"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "SWARM_CACHE_DIR": str(cache)})


@pytest.mark.slow
async def test_a_peer_joined_without_a_model_is_planned_in_and_fetches_its_units(tiny_model_dir, tmp_path):
    expected = generate(LocalChain.load(tiny_model_dir, [(0, 6)], max_slots=2, max_len=64), PROMPTS, NEW_TOKENS)
    cache = tmp_path / "peer-cache"
    proc = _join_open(tmp_path / "open.json", "open-1", cache)  # its profile: measured on another model
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready, "swarm join did not start"
        joined = json.loads(proc.stdout.readline())
        assert joined["any_model"] is True
        embed_bytes = ModelLayout.read(tiny_model_dir).unit_weight_bytes("float32")[0]
        config = SourceConfig(interfaces=["127.0.0.1"], model=tiny_model_dir, mem_bytes=embed_bytes, min_peers=1,
                              max_len=64, liveness=LivenessConfig(interval_s=HEARTBEAT_S),
                              probe=ProbeConfig(interval_s=60))
        async with SwarmSource(config) as source:
            got = [[t async for t in source.generate(p, NEW_TOKENS)] for p in PROMPTS]
            stages = source.current.stages
    finally:
        stop_processes([proc])
        log = proc.stderr.read()
        proc.stderr.close()
    assert got == expected
    assert [(s.start, s.end) for s in stages] == [(0, 1), (1, 6)] and stages[1].address == joined["address"]
    folder = units_dir(weights_fingerprint(tiny_model_dir), "float32", cache)
    assert holds_units(folder, range(1, 6)) and not holds_units(folder, range(0, 1))
    assert "receiving weights" in log and "MB/s" in log  # the join's progress lines


def _source_config(model, min_peers: int) -> SourceConfig:
    embed_bytes = ModelLayout.read(model).unit_weight_bytes("float32")[0]
    # B computes 200 times faster than A, a gain (~13 ms a token) far above the loopback links'
    # noise, so a plain plan takes B (a gain of 0.6 ms once lost to a link measured under load).
    # Whether a move repays itself depends on the loopback's
    # measured bandwidth, which swings with the machine's load: a horizon of 0 tokens (never
    # move for speed while a plan that moves nothing fits) keeps the decision off that noise;
    # the pure rule with real horizons is tests/planner/test_warm.py's.
    return SourceConfig(interfaces=["127.0.0.1"], model=model, mem_bytes=embed_bytes, min_peers=min_peers, max_len=64,
                        liveness=LivenessConfig(interval_s=HEARTBEAT_S), probe=ProbeConfig(interval_s=60),
                        warm_horizon_tokens=0)


def _started(proc) -> dict:
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    assert ready, "swarm join did not start"
    return json.loads(proc.stdout.readline())


@pytest.mark.slow
async def test_a_warm_peer_keeps_its_units_when_moving_them_would_not_pay_back(tiny_model_dir, tmp_path):
    """Peer A receives the units; B joins, faster but with an empty cache: the next plan leaves
    the units on A (moving them would not pay back within the horizon), where a plain plan takes B."""
    warm = _join_open(tmp_path / "a.json", "warm-a", tmp_path / "a-cache", block_decode_s=0.02)
    procs = [warm]
    try:
        a = _started(warm)
        async with SwarmSource(_source_config(tiny_model_dir, 1)) as source:
            first = [t async for t in source.generate(PROMPTS[0], NEW_TOKENS)]
            assert source.current.stages[1].address == a["address"]
        cold = _join_open(tmp_path / "b.json", "cold-b", tmp_path / "b-cache", block_decode_s=0.0001)
        procs.append(cold)
        b = _started(cold)
        async with SwarmSource(_source_config(tiny_model_dir, 2)) as source:
            planned = await source.plan()
            plain = plan_problem(Problem.from_json(planned.problem), objective="latency")
            names = planned.problem["peer_ids"]
            second = [t async for t in source.generate(PROMPTS[0], NEW_TOKENS)]
            stages = source.current.stages
    finally:
        stop_processes(procs)
        for proc in procs:
            proc.stderr.close()
    assert [names[s.device] for s in plain.stages][1] == b["joined"]  # without the units in view: B
    assert stages[1].address == a["address"] and second == first  # with them: A, warm, same tokens
    assert not (tmp_path / "b-cache" / "units").exists()
    assert "kept the units in place" in " ".join(planned.plan.notes)
