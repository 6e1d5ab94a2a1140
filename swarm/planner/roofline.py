"""Roofline cost model: per-unit times and memory from device specs (peers/testbed.json).

A unit's step time is the larger of moving its bytes and doing its arithmetic:

    t = max(bytes / (mem_bandwidth * MEM_EFFICIENCY), flops / (peak_flops * FLOP_EFFICIENCY))

- block: bytes = weights + KV cache read (b * context * kv_bytes_per_token);
  flops = 2 * params * b * T + 4 * b * T * context * hidden (attention scores and mix)
- embedding: a gather of b * T rows (bytes only; the table is not streamed)
- head: final norm + output projection weights; flops = 2 * vocab * hidden * b * T
with b sequences, T new tokens per sequence in the step, `context` tokens cached.
Decoding at batch 1 is memory bound: Llama2-7B fp32 streams 26.95 GB per token, so an
AGX Orin (204.8 GB/s) needs >= 131.6 ms; the paper measured 140.34 ms, which sets
MEM_EFFICIENCY = 0.94. Memory per unit = weights + KV preallocated for m * b * (I + G)
tokens. A hop carries b * T * hidden * dtype bytes; the last stage samples and returns
4-byte token ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from swarm.planner.problem import Problem

MEM_EFFICIENCY = 0.94  # paper: 140.34 ms measured vs 131.6 ms bound, Llama2-7B on AGX Orin
FLOP_EFFICIENCY = 0.6  # fp32 GEMMs on Ampere reach about 60% of peak
USABLE_MEMORY = 0.95  # share of nominal memory (GiB, as vendors quote it) left to the model
TOKEN_ID_BYTES = 4
TESTBED = Path(__file__).resolve().parents[2] / "peers" / "testbed.json"


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    mem_bytes: float
    flops: float
    mem_bandwidth: float


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    dtype_bytes: int

    @property
    def block_params(self) -> int:
        kv_dim = self.hidden // self.heads * self.kv_heads
        return 2 * self.hidden ** 2 + 2 * self.hidden * kv_dim + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.hidden // self.heads * self.kv_heads * self.dtype_bytes

    @property
    def n_units(self) -> int:
        return self.layers + 2

    @property
    def weight_bytes(self) -> float:
        return self.dtype_bytes * (self.layers * self.block_params + 2 * self.vocab * self.hidden + self.hidden)


@dataclass(frozen=True)
class Testbed:
    devices: dict[str, DeviceSpec]
    models: dict[str, ModelSpec]
    raw: dict[str, Any]


def load_testbed(path: Path = TESTBED) -> Testbed:
    raw = json.loads(Path(path).read_text())
    devices = {k: DeviceSpec(k, v["memory_GB"] * 2 ** 30 * USABLE_MEMORY, v["tflops_fp32"] * 1e12,
                             v["mem_bandwidth_GBps"] * 1e9) for k, v in raw["devices"].items()}
    models = {k: ModelSpec(k, **v) for k, v in raw["models"].items()}
    return Testbed(devices, models, raw)


def unit_times(dev: DeviceSpec, model: ModelSpec, b: int = 1, new_tokens: int = 1, context: int = 0) -> list[float]:
    """Step time of every unit (embed, blocks, head) for b sequences x new_tokens at `context`."""
    bw, fl = dev.mem_bandwidth * MEM_EFFICIENCY, dev.flops * FLOP_EFFICIENCY
    d, h = model.dtype_bytes, model.hidden
    rows = b * new_tokens
    embed = rows * h * d / bw
    block = max((model.block_params * d + b * context * model.kv_bytes_per_token) / bw,
                (2 * model.block_params * rows + 4 * rows * context * h) / fl)
    head = max((model.vocab * h + h) * d / bw, 2 * model.vocab * h * rows / fl)
    return [embed] + [block] * model.layers + [head]


def unit_layers(model: ModelSpec, b: int = 1, m: int = 1, context_total: int = 128, step_tokens: int = 1) -> list[dict]:
    """Problem `layers`: memory with KV for m * b sequences of context_total tokens; hop payloads."""
    d, h = model.dtype_bytes, model.hidden
    act = b * step_tokens * h * d
    kv = m * b * context_total * model.kv_bytes_per_token
    units = [{"name": "embed", "mem": model.vocab * h * d, "out": act}]
    units += [{"name": f"block.{i}", "mem": model.block_params * d + kv, "out": act} for i in range(model.layers)]
    units += [{"name": "head", "mem": (model.vocab * h + h) * d, "out": TOKEN_ID_BYTES * b}]
    return units


def testbed_problem(model: str, source_cloud_Mbps: float | None = None, b: int = 1, m: int = 1,
                    testbed: Testbed | None = None, phase: str = "decode") -> dict:
    """The paper's experiment as a problem JSON dict: source AGX, 11 AGX, 2 NX, 1 RTX 3090.

    Links: source <-> cloud at source_cloud_Mbps (paper: 1), others 50 Mb/s +- 20% (seeded,
    symmetric). Unit times are one decode step at the mean context I + G/2 (phase="decode")
    or one prefill step of I tokens (phase="prefill").
    """
    tb = testbed or load_testbed()
    spec, net, work = tb.models[model], tb.raw["network"], tb.raw["workload"]
    i_tok, g_tok = work["input_tokens"], work["generated_tokens"]
    swarm = tb.raw["swarm"]
    kinds = [swarm["source"]]
    for kind in tb.devices:
        kinds += [kind] * (swarm[kind] - (1 if kind == swarm["source"] else 0))
    cloud = kinds.index("rtx-3090")
    step, ctx = (i_tok, 0) if phase == "prefill" else (1, i_tok + g_tok // 2)
    devices = [{"name": f"{k}-{j}" if j else f"{k}-source", "kind": k, "mem": tb.devices[k].mem_bytes,
                "time": unit_times(tb.devices[k], spec, b, step, ctx)} for j, k in enumerate(kinds)]
    rng = np.random.default_rng(net["seed"])
    mbps = net["other_Mbps"] * rng.uniform(1 - net["other_variance"], 1 + net["other_variance"], (len(kinds),) * 2)
    mbps = np.triu(mbps, 1) + np.triu(mbps, 1).T
    sc = net["source_cloud_Mbps"] if source_cloud_Mbps is None else source_cloud_Mbps
    mbps[0, cloud] = mbps[cloud, 0] = sc
    np.fill_diagonal(mbps, 0.0)
    return {"model": model, "batch": b, "inflight": m, "phase": phase, "source": 0,
            "layers": unit_layers(spec, b, m, i_tok + g_tok, step),
            "devices": devices, "bandwidth": (mbps * 1e6 / 8).tolist(),
            "latency": [[0.0] * len(kinds) for _ in kinds], "return_bytes": TOKEN_ID_BYTES * b}


def testbed(model: str, **kw) -> Problem:
    return Problem.from_json(testbed_problem(model, **kw))
