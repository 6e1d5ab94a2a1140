"""The planning problem: units, devices, links; loading, validation and cost primitives.

Units are the model's pieces in execution order (embedding, blocks, head). A device
runs one contiguous range of units [a, b). Every cost the planners need is derived
here once (prefix sums, hop matrices) so the algorithms stay short.

Besides its units' times, a stage on device d pays fixed costs every step (issue 26):
``step_overhead[d]`` always (the shard's per-step constant), and ``hop_overhead[d]``
when the plan has more than one stage (waking up for a message, decoding it, encoding
and sending the result). Both occupy the stage, so they count in its stage time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class ProblemError(ValueError):
    """A malformed problem; the message starts with the offending field's path."""


class InfeasibleError(Exception):
    """No plan satisfies memory and links. Carries the memory figures for the message."""

    def __init__(self, message: str, needed_bytes: float, available_bytes: float, largest_device_bytes: float):
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes
        self.largest_device_bytes = largest_device_bytes


@dataclass(frozen=True, eq=False)
class Problem:
    """N units on M devices. Arrays are float64; bandwidth 0 means no link."""

    source: int
    layer_names: tuple[str, ...]
    layer_mem: np.ndarray  # [N] bytes, KV cache included
    layer_out: np.ndarray  # [N] bytes sent when cutting after the unit
    device_names: tuple[str, ...]
    device_mem: np.ndarray  # [M] bytes
    time: np.ndarray  # [M, N] seconds per unit
    bandwidth: np.ndarray  # [M, M] bytes/s from row to column
    latency: np.ndarray  # [M, M] seconds
    return_bytes: float
    extra: dict[str, Any] = field(default_factory=dict)  # ignored by the cost model
    step_overhead: np.ndarray | None = None  # [M] seconds per step of any stage on the device; None: 0
    hop_overhead: np.ndarray | None = None  # [M] seconds per step of a stage in a multi-stage plan; None: 0

    def __post_init__(self) -> None:
        for name in ("step_overhead", "hop_overhead"):
            value = getattr(self, name)
            value = np.zeros(len(self.device_names)) if value is None else np.asarray(value, dtype=float)
            if value.shape != (len(self.device_names),):
                raise ProblemError(f"{name}: expected {len(self.device_names)} numbers (one per device)")
            object.__setattr__(self, name, value)

    @property
    def n_units(self) -> int:
        return len(self.layer_names)

    @property
    def n_devices(self) -> int:
        return len(self.device_names)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Problem:
        """Build and validate a problem from its JSON dict (see issue 3 / docs/planner.md)."""
        if not isinstance(data, dict):
            raise ProblemError("problem: expected a JSON object")
        layers = _list(data, "layers", "problem")
        if not layers:
            raise ProblemError("layers: expected at least one unit")
        names, mems, outs = [], [], []
        for i, layer in enumerate(layers):
            where = f"layers[{i}]"
            if not isinstance(layer, dict):
                raise ProblemError(f"{where}: expected an object")
            names.append(str(layer.get("name", f"unit{i}")))
            mems.append(_number(layer, "mem", where))
            outs.append(_number(layer, "out", where))
        n = len(layers)
        devices = _list(data, "devices", "problem")
        if not devices:
            raise ProblemError("devices: expected at least one device")
        dnames, dmem, times, step_oh, hop_oh = [], [], [], [], []
        for j, dev in enumerate(devices):
            where = f"devices[{j}]"
            if not isinstance(dev, dict):
                raise ProblemError(f"{where}: expected an object")
            dnames.append(str(dev.get("name", f"device{j}")))
            dmem.append(_number(dev, "mem", where))
            # absent in problems written before issue 26: no fixed costs
            step_oh.append(_value(dev.get("step_overhead", 0.0), f"{where}.step_overhead"))
            hop_oh.append(_value(dev.get("hop_overhead", 0.0), f"{where}.hop_overhead"))
            t = _list(dev, "time", where)
            if len(t) != n:
                raise ProblemError(f"{where}.time: expected {n} numbers (one per unit), got {len(t)}")
            times.append([_value(x, f"{where}.time[{i}]") for i, x in enumerate(t)])
        m = len(devices)
        source = data.get("source", 0)
        if not isinstance(source, int) or isinstance(source, bool) or not 0 <= source < m:
            raise ProblemError(f"source: expected a device index in [0, {m}), got {source!r}")
        bandwidth = _matrix(data, "bandwidth", m, required=True)
        latency = _matrix(data, "latency", m, required=False)
        ret = data.get("return_bytes", outs[-1])
        ret = _value(ret, "return_bytes")
        known = {"source", "layers", "devices", "bandwidth", "latency", "return_bytes"}
        return cls(
            source=source,
            layer_names=tuple(names),
            layer_mem=np.array(mems, dtype=float),
            layer_out=np.array(outs, dtype=float),
            device_names=tuple(dnames),
            device_mem=np.array(dmem, dtype=float),
            time=np.array(times, dtype=float).reshape(m, n),
            bandwidth=bandwidth,
            latency=latency,
            return_bytes=ret,
            extra={k: v for k, v in data.items() if k not in known},
            step_overhead=np.array(step_oh, dtype=float),
            hop_overhead=np.array(hop_oh, dtype=float),
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON dict from_json reads back (extra fields kept)."""
        return {
            **self.extra,
            "source": self.source,
            "layers": [
                {"name": nm, "mem": float(mm), "out": float(o)}
                for nm, mm, o in zip(self.layer_names, self.layer_mem, self.layer_out)
            ],
            "devices": [
                {"name": nm, "mem": float(mm), "time": [float(x) for x in t],
                 "step_overhead": float(so), "hop_overhead": float(ho)}
                for nm, mm, t, so, ho in zip(self.device_names, self.device_mem, self.time,
                                             self.step_overhead, self.hop_overhead)
            ],
            "bandwidth": self.bandwidth.tolist(),
            "latency": self.latency.tolist(),
            "return_bytes": float(self.return_bytes),
        }

    # ---- cost primitives -------------------------------------------------------------

    def prefix_time(self) -> np.ndarray:
        """[M, N+1]: C_d(a, b) = P[d, b] - P[d, a]."""
        return np.concatenate([np.zeros((self.n_devices, 1)), np.cumsum(self.time, axis=1)], axis=1)

    def stage_overhead(self) -> np.ndarray:
        """[M]: fixed seconds a stage on each device pays per step in a plan of two or more stages."""
        return self.step_overhead + self.hop_overhead

    def alone_time(self) -> float:
        """The source's stage time when it runs every unit itself (no hop, so no hop overhead)."""
        return float(self.time[self.source].sum() + self.step_overhead[self.source])

    def prefix_mem(self) -> np.ndarray:
        """[N+1]: W(a, b) = P[b] - P[a]."""
        return np.concatenate([[0.0], np.cumsum(self.layer_mem)])

    def hop_time(self, payload: float | np.ndarray) -> np.ndarray:
        """[M, M] (or [..., M, M]) time of sending `payload` bytes over each link; inf without a link."""
        payload = np.asarray(payload, dtype=float)[..., None, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = self.latency + np.where(self.bandwidth > 0, payload / np.where(self.bandwidth > 0, self.bandwidth, 1), np.inf)
        return t

    def cut_hops(self) -> np.ndarray:
        """[N+1, M, M]: hop time when the next stage starts at unit a (payload out[a-1]); row 0 unused."""
        payload = np.concatenate([[0.0], self.layer_out])
        return self.hop_time(payload)

    def return_time(self) -> np.ndarray:
        """[M]: time to send return_bytes from a last stage back to the source; 0 on the source."""
        r = self.hop_time(self.return_bytes)[:, self.source].copy()
        r[self.source] = 0.0
        return r

    def infeasible(self, detail: str = "") -> InfeasibleError:
        """The error for a problem without a plan, with the memory figures."""
        needed = float(self.layer_mem.sum())
        available = float(self.device_mem.sum())
        largest = float(self.device_mem.max())
        if needed > available:
            msg = (f"infeasible: the model needs {fmt_bytes(needed)} but all {self.n_devices} devices "
                   f"together have {fmt_bytes(available)} (largest {fmt_bytes(largest)})")
        else:
            msg = (f"infeasible: the model needs {fmt_bytes(needed)} of {fmt_bytes(available)} in total, "
                   f"but no chain of linked devices starting at the source "
                   f"'{self.device_names[self.source]}' holds contiguous ranges within each device's memory")
        if detail:
            msg += f" ({detail})"
        return InfeasibleError(msg, needed, available, largest)


def fmt_bytes(x: float) -> str:
    """Human-readable bytes (decimal units, as memory specs are quoted)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} B"


def _list(obj: dict, key: str, where: str) -> list:
    if key not in obj:
        raise ProblemError(f"{key if where == 'problem' else where + '.' + key}: missing")
    val = obj[key]
    if not isinstance(val, list):
        raise ProblemError(f"{key if where == 'problem' else where + '.' + key}: expected a list")
    return val


def _value(x: Any, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x) or x < 0:
        raise ProblemError(f"{where}: expected a non-negative number, got {x!r}")
    return float(x)


def _number(obj: dict, key: str, where: str) -> float:
    if key not in obj:
        raise ProblemError(f"{where}.{key}: missing")
    return _value(obj[key], f"{where}.{key}")


def _matrix(data: dict, key: str, m: int, required: bool) -> np.ndarray:
    if key not in data:
        if required:
            raise ProblemError(f"{key}: missing")
        return np.zeros((m, m))
    rows = data[key]
    if not isinstance(rows, list) or len(rows) != m:
        raise ProblemError(f"{key}: expected {m} rows (one per device)")
    out = np.zeros((m, m))
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != m:
            raise ProblemError(f"{key}[{i}]: expected {m} numbers")
        for j, x in enumerate(row):
            out[i, j] = _value(x, f"{key}[{i}][{j}]")
    return out
