"""Profiling, the paper's first stage: what this device can hold and how fast it runs each unit.

For every unit: the time of a 32-token prefill, the time of one decode token over
a ~100-token KV cache, and their average (the paper found the average predicts
best); weight bytes, KV bytes per token, and the bytes sent when the model is
cut after it. Units are loaded one at a time and dropped after measuring (the
paper's dynamic model loading), so a device profiles a model it could never
hold whole. Results are cached per device, model, dtype, thread count and kernel build
(``kernels.kernel_id()``): a profile measured with other kernels is measured again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import psutil
import torch

from swarm.model.dtypes import dtype_name, torch_dtype
from swarm.model.kernels import kernel_id
from swarm.model.units import check_quant
from swarm.model.shard import Shard
from swarm.model.store import cache_root, weights_fingerprint
from swarm.model.units import ModelLayout

log = logging.getLogger(__name__)

PROFILE_VERSION = 2  # 2: the kernels that measured it are part of the profile and of its cache key
PREFILL_TOKENS = 32
DECODE_CONTEXT = 100
PREFILL_REPEATS = 3
DECODE_REPEATS = 8
WARMUP = 2
# Leave this share of free memory to the OS and other programs.
MEMORY_HEADROOM = 0.8


@dataclass(frozen=True)
class UnitProfile:
    name: str
    weight_bytes: int
    kv_bytes_per_token: int
    out_bytes_per_token: int
    prefill_s: float
    decode_s: float

    @property
    def time_s(self) -> float:
        return (self.prefill_s + self.decode_s) / 2


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    kind: str  # cpu | cuda | mps
    threads: int
    mem_bytes: int  # usable for weights and KV cache


@dataclass(frozen=True)
class ModelInfo:
    name: str
    fingerprint: str
    num_units: int
    dtype: str
    hidden_size: int
    quant: str | None = None  # int8 | int4 weights; part of the fingerprint too


@dataclass(frozen=True)
class DeviceProfile:
    device: DeviceInfo
    model: ModelInfo
    units: list[UnitProfile]
    prefill_tokens: int = PREFILL_TOKENS
    decode_context: int = DECODE_CONTEXT
    measured_s: float = 0.0
    version: int = field(default=PROFILE_VERSION)
    kernels: str = ""  # swarm.model.kernels.kernel_id() when measured: other kernels, other times

    def to_json(self) -> dict:
        data = asdict(self)
        for unit, raw in zip(self.units, data["units"]):
            raw["time_s"] = unit.time_s
        return data

    @classmethod
    def from_json(cls, data: dict) -> "DeviceProfile":
        if data.get("version") != PROFILE_VERSION:
            raise ValueError(f"profile version {data.get('version')!r} is not {PROFILE_VERSION}")
        units = [UnitProfile(**{k: v for k, v in u.items() if k != "time_s"}) for u in data["units"]]
        return cls(DeviceInfo(**data["device"]), ModelInfo(**data["model"]), units,
                   data["prefill_tokens"], data["decode_context"], data.get("measured_s", 0.0), data["version"],
                   data.get("kernels", ""))

    def with_memory(self, mem_bytes: int) -> "DeviceProfile":
        device = DeviceInfo(self.device.name, self.device.kind, self.device.threads, mem_bytes)
        return DeviceProfile(device, self.model, self.units, self.prefill_tokens, self.decode_context,
                             self.measured_s, self.version, self.kernels)


def usable_memory(device: torch.device, limit: int | None = None) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:  # CPU and Apple's unified memory
        free = psutil.virtual_memory().available
    usable = int(free * MEMORY_HEADROOM)
    return min(usable, limit) if limit else usable


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.node()} ({platform.machine()} {device.type})"


def _median_seconds(run: Callable[[], object], repeats: int, reset: Callable[[], None] | None = None) -> float:
    times = []
    for _ in range(repeats):
        if reset:
            reset()
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def measure_unit(shard: Shard) -> tuple[float, float]:
    """(prefill seconds for PREFILL_TOKENS tokens, decode seconds for one token at DECODE_CONTEXT)."""
    generator = torch.Generator().manual_seed(0)

    def inputs(width: int) -> torch.Tensor:
        if shard.is_first:
            return torch.randint(0, shard.layout.vocab_size, (1, width), generator=generator)
        return torch.randn(1, width, shard.hidden_size, generator=generator).to(shard.device, shard.dtype)

    prompt, context, token = inputs(PREFILL_TOKENS), inputs(DECODE_CONTEXT), inputs(1)
    # Warm-up runs are not timed: first calls allocate and fill caches.
    prefill = _median_seconds(lambda: shard.step([0], prompt), WARMUP + PREFILL_REPEATS, lambda: shard.open_slot(0))
    prefill = _median_seconds(lambda: shard.step([0], prompt), PREFILL_REPEATS, lambda: shard.open_slot(0))
    shard.open_slot(0)
    shard.step([0], context)
    _median_seconds(lambda: shard.step([0], token), WARMUP)
    decode = _median_seconds(lambda: shard.step([0], token), DECODE_REPEATS)
    return prefill, decode


def profile_device(model_dir: Path, *, threads: int, dtype: str = "float32", device: str = "cpu",
                   quant: str | None = None, mem_limit: int | None = None, use_cache: bool = True,
                   on_unit: Callable[[int, int, str], None] | None = None) -> DeviceProfile:
    """Measure this device for the model in ``model_dir`` (cached per device and model).

    ``threads`` must be the torch thread count the peer will serve with; it is set here.
    ``quant`` (int8 | int4) profiles the quantized units: their bytes and their times.
    """
    torch.set_num_threads(threads)
    torch_device = torch.device(device)
    layout = ModelLayout.read(model_dir)
    dtype = dtype_name(torch_dtype(dtype))
    mem = usable_memory(torch_device, mem_limit)
    quant = check_quant(quant)
    fingerprint = weights_fingerprint(model_dir, quant)
    name = device_name(torch_device)
    kernel = kernel_id()
    cache_file = profile_cache_path(name, fingerprint, dtype, threads, device, kernel)
    if use_cache and cache_file.exists():
        try:
            return DeviceProfile.from_json(json.loads(cache_file.read_text())).with_memory(mem)
        except (ValueError, KeyError, TypeError) as err:
            log.warning("ignoring unreadable cached profile %s: %s", cache_file, err)

    began = time.perf_counter()
    names = layout.unit_names()
    weights = layout.unit_weight_bytes(dtype, quant)
    kv = layout.kv_bytes_per_token(dtype)
    out = layout.out_bytes_per_token(dtype)
    units = []
    for i in range(layout.num_units):
        if on_unit:
            on_unit(i, layout.num_units, names[i])
        if weights[i] > mem:
            raise MemoryError(f"unit {names[i]} needs {weights[i] / 1e6:.0f} MB; this device has {mem / 1e6:.0f} MB usable")
        shard = Shard.load(model_dir, i, i + 1, max_slots=1, max_len=DECODE_CONTEXT + WARMUP + DECODE_REPEATS,
                           dtype=dtype, device=torch_device, quant=quant)
        prefill, decode = measure_unit(shard)
        del shard  # one unit in memory at a time
        units.append(UnitProfile(names[i], weights[i], kv[i], out[i], prefill, decode))
    model = ModelInfo(model_dir.name, fingerprint, layout.num_units, dtype, layout.hidden_size, quant)
    profile = DeviceProfile(DeviceInfo(name, torch_device.type, threads, mem), model, units,
                            measured_s=time.perf_counter() - began, kernels=kernel)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps(profile.to_json(), indent=1))
    return profile


def profile_cache_path(device_name_: str, fingerprint: str, dtype: str, threads: int, device: str,
                       kernels: str) -> Path:
    """Where a profile is cached: one per device, weights, dtype, thread count and kernel build."""
    key = hashlib.sha256(f"{device_name_}|{device}|{fingerprint}|{dtype}|{threads}|{kernels}".encode()).hexdigest()[:16]
    return cache_root() / "profiles" / f"{fingerprint}-{dtype}-t{threads}-{key}.json"
