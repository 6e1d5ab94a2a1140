"""Profiles: measured with the kernels that will serve, and never reused across kernel builds."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from swarm.model import profile as profiling
from swarm.model.kernels import kernel_id
from swarm.model.profile import profile_device


def test_a_profile_measured_with_other_kernels_is_measured_again(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(profiling, "loaded", lambda others, threads: False)  # a busy test machine
    first = profile_device(tiny_model_dir, threads=1, quant="int8")
    assert first.kernels == kernel_id()
    cached = profile_device(tiny_model_dir, threads=1, quant="int8")
    assert cached.measured_s == first.measured_s and cached.units == first.units
    monkeypatch.setattr(profiling, "kernel_id", lambda: "999-elsewhere")
    remeasured = profile_device(tiny_model_dir, threads=1, quant="int8")
    assert remeasured.kernels == "999-elsewhere"
    assert remeasured.measured_s != first.measured_s


def test_the_shard_line_gives_the_per_step_constant_and_a_block_in_a_shard():
    constant, block = 0.0015, 0.0035
    c, b = profiling.shard_line(constant, 8, constant + 8 * block)
    assert c == constant and abs(b - block) < 1e-12
    assert profiling.shard_line(0.05, 8, 0.03) == (0.03, 0.0)  # never more constant than the whole step
    units = [profiling.UnitProfile(n, w, 1, 1, p, d) for n, w, p, d in
             (("embed", 50, 0.002, 0.0016), ("b0", 9, 0.010, 0.0009), ("b1", 11, 0.012, 0.0011),
              ("head", 50, 0.05, 0.021))]
    got = profiling.in_shard_units(units, 0.001, 0.02, 0.0015, 0.0035)
    # blocks: the shard's block time, by their bytes (not their noisy alone times); the ends: alone minus the constant
    assert [u.decode_s for u in got] == pytest.approx([0.0016 * profiling.MIN_UNIT_SHARE, 0.0035 * 0.9,
                                                       0.0035 * 1.1, 0.021 - 0.0015], rel=1e-12)
    assert [u.prefill_s for u in got] == pytest.approx([0.001, 0.02 * 0.9, 0.02 * 1.1, 0.049], rel=1e-12)


def test_the_head_is_timed_after_blocks_in_a_shard(tiny_model_dir, monkeypatch):
    """Alone, a head stays in the caches run after run; a stage runs it after its blocks."""
    head = profiling.UnitProfile("head", 50, 0, 4, 0.009, 0.004)
    got = profiling.head_in_shard(head, 0.0061)
    # decode: its time inside the step; prefill draws at one position, the same
    assert (got.prefill_s, got.decode_s) == pytest.approx((0.0061, 0.0061), rel=1e-12)
    assert got.weight_bytes == 50 and got.name == "head"
    floor = profiling.head_in_shard(head, 0.0001)  # noise never makes it free
    assert (floor.prefill_s, floor.decode_s) == pytest.approx((0.0004, 0.0004), rel=1e-12)

    # timed inside decode steps of a last shard: a part of each step, and the shard is left as it was
    n = len(profiling.ModelLayout.read(tiny_model_dir).unit_names())
    tail = profiling._load_for_profiling(tiny_model_dir, 1, n, "float32", torch.device("cpu"), None)
    inside = profiling.measure_head_in_step(tail)
    assert "logits" not in vars(tail)
    assert 0 < inside < 0.7 * profiling.measure_decode(tail)  # about a quarter of this tiny model's step

    # and the profile measures that shard: the last blocks that fit beside the head, and the head
    monkeypatch.setattr(profiling, "loaded", lambda others, threads: False)
    shards = []
    load = profiling._load_for_profiling
    monkeypatch.setattr(profiling, "_load_for_profiling", lambda model, start, end, *a: shards.append((start, end)) or
                        load(model, start, end, *a))
    profile = profile_device(tiny_model_dir, threads=1, use_cache=False)
    n = len(profile.units)
    # each unit alone; every block; every block and the head (all fit here)
    assert shards == [(i, i + 1) for i in range(n)] + [(1, n - 1), (1, n)]


def test_profile_units_are_times_in_a_shard_and_old_caches_are_measured_again(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(profiling, "loaded", lambda others, threads: False)
    fresh = profile_device(tiny_model_dir, threads=1, use_cache=False)
    assert fresh.version == profiling.PROFILE_VERSION == 6
    assert fresh.step_decode_s >= 0 and fresh.step_prefill_s >= 0
    # a version-2 cache (units alone, no constant) at the same path is never read as version 6
    path = profiling.profile_cache_path(fresh.device.name, fresh.model.fingerprint, fresh.model.dtype, 1, "cpu",
                                        fresh.kernels)
    old = fresh.to_json()
    old["version"] = 2
    for key in ("step_decode_s", "step_prefill_s", "others_busy_cpus", "under_load"):
        del old[key]
    path.write_text(json.dumps(old))
    again = profile_device(tiny_model_dir, threads=1)
    assert again.version == 6 and again.measured_s != fresh.measured_s
    assert json.loads(path.read_text())["version"] == 6


def test_a_profile_taken_under_load_is_marked_and_measured_again_when_quiet(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(profiling, "loaded", lambda others, threads: True)
    began = time.monotonic()
    assert not profiling.wait_for_quiet(1, 0.3) and time.monotonic() - began >= 0.3
    busy = profile_device(tiny_model_dir, threads=1, use_cache=False, quiet_wait_s=0.1)
    assert busy.under_load
    monkeypatch.setattr(profiling, "quiet_now", lambda *args: False)
    assert profile_device(tiny_model_dir, threads=1).measured_s == busy.measured_s  # still busy: kept
    monkeypatch.setattr(profiling, "loaded", lambda others, threads: False)
    monkeypatch.setattr(profiling, "quiet_now", lambda *args: True)
    quiet = profile_device(tiny_model_dir, threads=1)
    assert not quiet.under_load and quiet.measured_s != busy.measured_s
    assert profiling.wait_for_quiet(1, 5.0)
    assert profile_device(tiny_model_dir, threads=1).measured_s == quiet.measured_s  # a quiet profile is kept


def test_the_load_meter_sees_another_process_busy():
    meter = profiling.LoadMeter()
    spin = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 0.8\nwhile time.time() < end: pass"])
    spin.wait()
    assert meter.others_busy_cpus() > 0.3
