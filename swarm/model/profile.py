"""Profiling, the paper's first stage: what this device can hold and how fast it runs each unit.

For every unit: the time of a 32-token prefill, the time of one decode token over
a ~100-token KV cache, and their average; weight bytes, KV bytes per token, and the
bytes sent when the model is cut after it. Units are loaded one at a time and dropped
after measuring (the paper's dynamic model loading), so a device profiles a model it
could never hold whole.

A unit measured alone is not a unit in a shard (issue 26). Run again and again, its
weights stay in the CPU's caches, and alone it pays the whole per-step constant of
``Shard.step`` that a shard pays once. So a shard of k blocks is measured too (t_k), k
as many blocks as the device holds (all of them when they fit): how much the caches
flatter a block depends on how much else a step reads. On this Xeon (a 480 MiB L3),
SmolLM2 blocks in float32 decode at 0.90 ms in a shard of 8 (113 MB, cached whole) and
0.99 ms in a shard of 30, and the whole model (533 MB) takes 41 ms where 8-block figures
add up to 36. The embedding alone is almost only
that constant (a lookup of one row), so c = its time, and a block in a shard takes
b = (t_k - c) / k (``shard_line``; one shard, not the slope between two, which doubles
the noise). Each block's figure is b, in proportion to its bytes (a block alone is
too short to time under a CPU quota: one run fits in a period's quota, the next waits
out the period; the testbed's source once timed one block alone at 2.4 times the
others). The embedding (a lookup of one row) keeps its alone time minus c. The head is
timed where a stage runs it, after blocks, and inside the step: in decode steps of a shard
of the last blocks and the head, the step's time times the head's share of its CPU time
(``measure_head_in_step``; a prefill step draws at its last position only, so the same
figure is its prefill time). Not as that shard's step less the blocks' figures: under a
CPU quota each step varies by about 10%, and the difference of two such figures carried
all of it (a peer of 0.35 CPU got 39.8 ms for a head its alone-based figure put at 20.2).
Alone, run again and again, SmolLM2's 113 MB head stayed in the L3 and took 4.2 ms a
token; after 30 blocks it is read from memory, 8-12 ms, and profiles that used its alone
time predicted a whole-model step 20-25% short. The constant is kept (``step_decode_s``): a stage pays it once per step (the planner's
``step_overhead``). The planner plans decode with the decode times; prefill times give
the first token.

A profile is only as true as the device was quiet: the CPU time other processes
used while it was measured is recorded (``others_busy_cpus``) and a profile taken
with fewer than ``threads`` CPUs left idle is marked ``under_load``; it is measured
again the next time it is read on a quiet device. Processes profiling on one machine
take turns (a file lock), so peers started together do not measure each other's load,
and the later ones read the first one's profile from the cache.

Results are cached per device, model, dtype, thread count and kernel build
(``kernels.kernel_id()``): a profile measured with other kernels is measured again,
and so is one of another ``PROFILE_VERSION`` (never misread).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
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

# 2: the kernels that measured it are part of the profile and of its cache key.
# 3: unit times are times in a shard (the per-step constant apart, step_*_s); load recorded.
# 4: ... in a shard of every block the device holds (not 8, which a large cache holds whole).
# 5: the head's time is its time after blocks in a shard, not alone.
# 6: ... its share of those steps' CPU time, not a difference of two shards' steps.
PROFILE_VERSION = 6
PREFILL_TOKENS = 32
DECODE_CONTEXT = 100
PREFILL_REPEATS = 3
DECODE_REPEATS = 8
WARMUP = 2
# Leave this share of free memory to the OS and other programs.
MEMORY_HEADROOM = 0.8
MIN_UNIT_SHARE = 0.1  # a unit keeps at least this share of its alone time once the constant is taken off
QUIET_CHECK_S = 0.5  # how long the device is watched before re-measuring a profile taken under load
QUIET_WAIT_S = 5.0  # before profiling, the longest wait for other processes to leave the CPUs (peers starting)


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
    step_decode_s: float = 0.0  # per-step constant of a decode step, paid once per stage (issue 26)
    step_prefill_s: float = 0.0  # the same for a prefill step
    others_busy_cpus: float = 0.0  # CPUs other processes kept busy, on average, while this was measured
    under_load: bool = False  # fewer than `threads` CPUs were left idle: the times may be slow

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
                   data.get("kernels", ""), float(data["step_decode_s"]), float(data["step_prefill_s"]),
                   float(data["others_busy_cpus"]), bool(data["under_load"]))

    def with_memory(self, mem_bytes: int) -> "DeviceProfile":
        device = DeviceInfo(self.device.name, self.device.kind, self.device.threads, mem_bytes)
        return replace(self, device=device)


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
    """The median of ``repeats`` timed runs. Not the fastest: on a device under a CPU quota
    (a container, the testbed's devices) the throttling is the device's own steady cost, and
    the fastest run is the one that happened to miss it; other processes' load is kept out
    by taking turns and waiting for quiet instead (see the module docstring)."""
    times = []
    for _ in range(repeats):
        if reset:
            reset()
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _inputs(shard: Shard) -> Callable[[int], torch.Tensor]:
    """Random step inputs of a width for ``shard``: token ids for the first shard, else hidden states."""
    generator = torch.Generator().manual_seed(0)

    def inputs(width: int) -> torch.Tensor:
        if shard.is_first:
            return torch.randint(0, shard.layout.vocab_size, (1, width), generator=generator)
        return torch.randn(1, width, shard.hidden_size, generator=generator).to(shard.device, shard.dtype)

    return inputs


def measure_unit(shard: Shard) -> tuple[float, float]:
    """(prefill seconds for PREFILL_TOKENS tokens, decode seconds for one token at DECODE_CONTEXT)."""
    inputs = _inputs(shard)
    prompt = inputs(PREFILL_TOKENS)
    # Warm-up runs are not timed: first calls allocate and fill caches.
    prefill = _median_seconds(lambda: shard.step([0], prompt), WARMUP + PREFILL_REPEATS, lambda: shard.open_slot(0))
    prefill = _median_seconds(lambda: shard.step([0], prompt), PREFILL_REPEATS, lambda: shard.open_slot(0))
    return prefill, measure_decode(shard, inputs)


def _ready_to_decode(shard: Shard, inputs: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
    """Slot 0 opened and holding DECODE_CONTEXT positions; returns a one-token input."""
    inputs = inputs or _inputs(shard)
    context, token = inputs(DECODE_CONTEXT), inputs(1)
    shard.open_slot(0)
    shard.step([0], context)
    return token


def measure_decode(shard: Shard, inputs: Callable[[int], torch.Tensor] | None = None) -> float:
    """Decode seconds for one token at DECODE_CONTEXT."""
    token = _ready_to_decode(shard, inputs)
    _median_seconds(lambda: shard.step([0], token), WARMUP)
    return _median_seconds(lambda: shard.step([0], token), DECODE_REPEATS)


def shard_line(constant: float, k: int, t_k: float) -> tuple[float, float]:
    """(c, b) of the step time t(k) = c + k b of a shard of k blocks, timed t_k, with the
    per-step constant at most ``constant`` (the embedding alone): b per block in a shard."""
    c = min(max(constant, 0.0), t_k)
    return c, (t_k - c) / k


def in_shard(alone: float, constant: float) -> float:
    """A unit's time in a shard: alone minus the per-step constant (never below MIN_UNIT_SHARE of it)."""
    return max(alone - constant, MIN_UNIT_SHARE * alone)


def in_shard_units(units: list[UnitProfile], step_prefill: float, block_prefill: float, step_decode: float,
                   block_decode: float) -> list[UnitProfile]:
    """Units measured alone -> their times in a shard: each block the block time of the shard
    line, in proportion to its weight bytes (a block alone is too short to time under a CPU
    quota: one run fits in a period's quota, the next waits out the period); the embedding
    and the head their alone time minus the per-step constant."""
    blocks = units[1:-1]
    mean_bytes = statistics.fmean(u.weight_bytes for u in blocks) if blocks else 0.0
    out = []
    for i, u in enumerate(units):
        if 0 < i < len(units) - 1 and mean_bytes > 0:
            share = u.weight_bytes / mean_bytes
            out.append(replace(u, prefill_s=block_prefill * share, decode_s=block_decode * share))
        else:
            out.append(replace(u, prefill_s=in_shard(u.prefill_s, step_prefill),
                               decode_s=in_shard(u.decode_s, step_decode)))
    return out


def head_in_shard(alone: UnitProfile, head_s: float) -> UnitProfile:
    """The head's times from its time inside a step after blocks (never below MIN_UNIT_SHARE of
    its alone time). A prefill step draws at its last position only: the same figure."""
    head = max(head_s, MIN_UNIT_SHARE * alone.decode_s)
    return replace(alone, prefill_s=head, decode_s=head)


def measure_head_in_step(shard: Shard) -> float:
    """Decode seconds of the head inside decode steps of ``shard`` (a last shard, after its blocks):
    the median step's wall time times the head's share of the steps' CPU time (from the head's
    first operation, ``Shard.logits``, to the step's end), over DECODE_REPEATS steps at
    DECODE_CONTEXT. Its share of the CPU, not the wall time of that part of the step: under a
    CPU quota a step is throttled where its quota runs out, often after its last operation."""
    token = _ready_to_decode(shard)
    starts: list[float] = []
    logits = shard.logits

    def timed(hidden: torch.Tensor) -> torch.Tensor:
        starts.append(time.process_time())  # every thread's: torch may compute on several
        return logits(hidden)

    shard.logits = timed  # on this instance only: the profile's own shard
    try:
        for _ in range(WARMUP):
            shard.step([0], token)
        walls, step_cpu, head_cpu = [], 0.0, 0.0
        for _ in range(DECODE_REPEATS):
            began, cpu_began = time.perf_counter(), time.process_time()
            shard.step([0], token)
            cpu_ended = time.process_time()
            walls.append(time.perf_counter() - began)
            step_cpu += cpu_ended - cpu_began
            head_cpu += cpu_ended - starts[-1]
    finally:
        del shard.logits
    return statistics.median(walls) * head_cpu / step_cpu if step_cpu > 0 else 0.0


class LoadMeter:
    """CPU time other processes use from now on, in CPUs (1.0 = one core kept busy)."""

    def __init__(self) -> None:
        self._began = time.monotonic(), _busy_cpu_s(), _own_cpu_s()

    def others_busy_cpus(self) -> float:
        t0, busy0, own0 = self._began
        wall = time.monotonic() - t0
        if wall <= 0:
            return 0.0
        return max(0.0, (_busy_cpu_s() - busy0) - (_own_cpu_s() - own0)) / wall


def _busy_cpu_s() -> float:
    t = psutil.cpu_times()
    return sum(t) - getattr(t, "idle", 0.0) - getattr(t, "iowait", 0.0)


def _own_cpu_s() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def loaded(others_busy_cpus: float, threads: int) -> bool:
    """Fewer than ``threads`` CPUs (with half a CPU to spare) were left to this process."""
    return others_busy_cpus > (os.cpu_count() or 1) - threads - 0.5


def quiet_now(threads: int, watch_s: float = QUIET_CHECK_S) -> bool:
    """Whether other processes leave this device's CPUs to us now (watched for ``watch_s``)."""
    meter = LoadMeter()
    time.sleep(watch_s)
    return not loaded(meter.others_busy_cpus(), threads)


def wait_for_quiet(threads: int, limit_s: float) -> bool:
    """Wait, at most ``limit_s``, until other processes leave this device's CPUs (peers that
    start together import and load for a few seconds); True when it is quiet."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if quiet_now(threads, min(QUIET_CHECK_S, max(0.05, deadline - time.monotonic()))):
            return True
    return False


@contextlib.contextmanager
def _profiling_turn():
    """One process of this machine profiles at a time (an advisory file lock in the machine's
    temporary folder, released by the OS if the holder dies): peers started together do not
    measure each other's load, whatever cache each of them uses (the testbed's devices each
    have their own)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): profile without taking turns
        yield
        return
    with open(Path(tempfile.gettempdir()) / f"swarm-profiling-{getattr(os, 'getuid', lambda: 0)()}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_cache(cache_file: Path, mem: int) -> DeviceProfile | None:
    if not cache_file.exists():
        return None
    try:
        return DeviceProfile.from_json(json.loads(cache_file.read_text())).with_memory(mem)
    except (ValueError, KeyError, TypeError) as err:
        log.warning("measuring again: cached profile %s is not usable: %s", cache_file, err)
        return None


def profile_device(model_dir: Path, *, threads: int, dtype: str = "float32", device: str = "cpu",
                   quant: str | None = None, mem_limit: int | None = None, use_cache: bool = True,
                   on_unit: Callable[[int, int, str], None] | None = None,
                   quiet_wait_s: float = QUIET_WAIT_S) -> DeviceProfile:
    """Measure this device for the model in ``model_dir`` (cached per device and model).

    ``threads`` must be the torch thread count the peer will serve with; it is set here.
    ``quant`` (int8 | int4) profiles the quantized units: their bytes and their times.
    A cached profile is used unless it was taken under load and the device is quiet now.
    Before measuring, it waits up to ``quiet_wait_s`` for the device to be quiet.
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
    cached = _read_cache(cache_file, mem) if use_cache else None
    if cached is not None and not cached.under_load:
        return cached
    with _profiling_turn():
        if use_cache:  # another process may have measured it while this one waited its turn
            cached = _read_cache(cache_file, mem)
            if cached is not None and not (cached.under_load and quiet_now(threads)):
                return cached
        wait_for_quiet(threads, quiet_wait_s)
        profile = _measure(model_dir, layout, torch_device, dtype, quant, mem, fingerprint, name, threads, kernel,
                           on_unit)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(profile.to_json(), indent=1))
    if profile.under_load:
        log.warning("profiled while other processes kept %.1f CPUs busy: unit times may be slow; "
                    "they are measured again once this device is quiet", profile.others_busy_cpus)
    return profile


def _load_for_profiling(model_dir: Path, start: int, end: int, dtype: str, torch_device: torch.device,
                        quant: str | None) -> Shard:
    return Shard.load(model_dir, start, end, max_slots=1, max_len=DECODE_CONTEXT + WARMUP + DECODE_REPEATS,
                      dtype=dtype, device=torch_device, quant=quant)


def _measure(model_dir: Path, layout: ModelLayout, torch_device: torch.device, dtype: str, quant: str | None,
             mem: int, fingerprint: str, name: str, threads: int, kernel: str,
             on_unit: Callable[[int, int, str], None] | None) -> DeviceProfile:
    began = time.perf_counter()
    meter = LoadMeter()
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
        shard = _load_for_profiling(model_dir, i, i + 1, dtype, torch_device, quant)
        prefill, decode = measure_unit(shard)
        del shard  # one unit in memory at a time
        units.append(UnitProfile(names[i], weights[i], kv[i], out[i], prefill, decode))
    # Blocks back to back in one shard: their time in a shard (and the per-step constant).
    k = layout.num_units - 2
    while k >= 1 and sum(weights[1:1 + k]) > mem:
        k -= 1
    step_prefill = step_decode = 0.0
    if k >= 1:
        blocks = measure_unit(_load_for_profiling(model_dir, 1, 1 + k, dtype, torch_device, quant))
        step_prefill, block_prefill = shard_line(units[0].prefill_s, k, blocks[0])
        step_decode, block_decode = shard_line(units[0].decode_s, k, blocks[1])
        units = in_shard_units(units, step_prefill, block_prefill, step_decode, block_decode)
        # The head after the last blocks, as a stage that holds it runs it.
        head = layout.num_units - 1
        j = min(k, head - 1)
        while j >= 1 and sum(weights[head - j:]) > mem:
            j -= 1
        if j >= 1:
            units[head] = head_in_shard(units[head], measure_head_in_step(
                _load_for_profiling(model_dir, head - j, head + 1, dtype, torch_device, quant)))
    others = meter.others_busy_cpus()
    model = ModelInfo(model_dir.name, fingerprint, layout.num_units, dtype, layout.hidden_size, quant)
    return DeviceProfile(DeviceInfo(name, torch_device.type, threads, mem), model, units,
                         measured_s=time.perf_counter() - began, kernels=kernel, step_decode_s=step_decode,
                         step_prefill_s=step_prefill, others_busy_cpus=others, under_load=loaded(others, threads))


def profile_cache_path(device_name_: str, fingerprint: str, dtype: str, threads: int, device: str,
                       kernels: str) -> Path:
    """Where a profile is cached: one per device, weights, dtype, thread count and kernel build."""
    key = hashlib.sha256(f"{device_name_}|{device}|{fingerprint}|{dtype}|{threads}|{kernels}".encode()).hexdigest()[:16]
    return cache_root() / "profiles" / f"{fingerprint}-{dtype}-t{threads}-{key}.json"
