"""Profiles: measured with the kernels that will serve, and never reused across kernel builds."""

from __future__ import annotations

import json
import subprocess
import sys

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


def test_the_per_step_constant_is_solved_from_units_alone_and_together():
    units, constant = [0.004, 0.005, 0.006], 0.0015
    alone = [constant + u for u in units]
    assert abs(profiling.per_step_constant(alone, constant + sum(units)) - constant) < 1e-12
    assert profiling.per_step_constant(alone, sum(alone) + 1) == 0.0  # noise never makes it negative
    assert profiling.per_step_constant([0.003], 0.003) == 0.0  # one unit says nothing
    assert profiling.in_shard(0.0055, constant) == 0.0055 - constant
    assert profiling.in_shard(0.001, constant) == 0.001 * profiling.MIN_UNIT_SHARE


def test_profile_units_are_times_in_a_shard_and_old_caches_are_measured_again(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(profiling, "loaded", lambda others, threads: False)
    fresh = profile_device(tiny_model_dir, threads=1, use_cache=False)
    assert fresh.version == profiling.PROFILE_VERSION == 3
    assert fresh.step_decode_s > 0 and fresh.step_prefill_s >= 0
    # a version-2 cache (units alone, no constant) at the same path is never read as version 3
    path = profiling.profile_cache_path(fresh.device.name, fresh.model.fingerprint, fresh.model.dtype, 1, "cpu",
                                        fresh.kernels)
    old = fresh.to_json()
    old["version"] = 2
    for key in ("step_decode_s", "step_prefill_s", "others_busy_cpus", "under_load"):
        del old[key]
    path.write_text(json.dumps(old))
    again = profile_device(tiny_model_dir, threads=1)
    assert again.version == 3 and again.measured_s != fresh.measured_s
    assert json.loads(path.read_text())["version"] == 3


def test_a_profile_taken_under_load_is_marked_and_measured_again_when_quiet(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(profiling, "loaded", lambda others, threads: True)
    busy = profile_device(tiny_model_dir, threads=1, use_cache=False)
    assert busy.under_load
    monkeypatch.setattr(profiling, "quiet_now", lambda threads: False)
    assert profile_device(tiny_model_dir, threads=1).measured_s == busy.measured_s  # still busy: kept
    monkeypatch.setattr(profiling, "loaded", lambda others, threads: False)
    monkeypatch.setattr(profiling, "quiet_now", lambda threads: True)
    quiet = profile_device(tiny_model_dir, threads=1)
    assert not quiet.under_load and quiet.measured_s != busy.measured_s
    assert profile_device(tiny_model_dir, threads=1).measured_s == quiet.measured_s  # a quiet profile is kept


def test_the_load_meter_sees_another_process_busy():
    meter = profiling.LoadMeter()
    spin = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 0.8\nwhile time.time() < end: pass"])
    spin.wait()
    assert meter.others_busy_cpus() > 0.3
