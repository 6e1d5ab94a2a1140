"""Profiles: measured with the kernels that will serve, and never reused across kernel builds."""

from __future__ import annotations

from swarm.model import profile as profiling
from swarm.model.kernels import kernel_id
from swarm.model.profile import profile_device


def test_a_profile_measured_with_other_kernels_is_measured_again(tiny_model_dir, monkeypatch):
    first = profile_device(tiny_model_dir, threads=1, quant="int8")
    assert first.kernels == kernel_id()
    cached = profile_device(tiny_model_dir, threads=1, quant="int8")
    assert cached.measured_s == first.measured_s and cached.units == first.units
    monkeypatch.setattr(profiling, "kernel_id", lambda: "999-elsewhere")
    remeasured = profile_device(tiny_model_dir, threads=1, quant="int8")
    assert remeasured.kernels == "999-elsewhere"
    assert remeasured.measured_s != first.measured_s
