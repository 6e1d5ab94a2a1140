"""Weights over the swarm on loopback: transfer rate, and the receiver's memory against the bytes moved.

A one-layer Llama whose embedding (and tied head, which a unit file holds as its own
copy) is ``--mb`` MB each, in float32, is written to a temporary folder. This process
holds it (``HolderServer``, as a source does) and writes its unit files first (timed
apart); a fresh receiver process then fetches every unit over an encrypted loopback
connection into a cache of its own (``fetch_units``, as a peer does inside LOAD) and
reports its peak resident-size growth (VmHWM, reset just before) and the rate.

    python benchmarks/bench_transfer.py [--mb 256] [--chunk-kib 1024] [--window 4] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECEIVE_SCRIPT = """
import asyncio, json, sys, time
from pathlib import Path
from swarm.runtime.client import PeerClient
from swarm.runtime.transfer import TransferConfig, fetch_units
from swarm.runtime.wire import Kind

def status_kib(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])

async def main(address, fp, units, root, chunk, window):
    async with PeerClient(address) as holder:
        # connected and handshaken before the clock starts
        await holder.request(Kind.MANIFEST, {"fp": fp, "dtype": "float32", "quant": None})
        open("/proc/self/clear_refs", "w").write("5")
        before = status_kib("VmRSS:")
        began = time.perf_counter()
        progress = []
        await fetch_units(holder, fp, "float32", None, range(units), root=Path(root),
                          config=TransferConfig(chunk_bytes=chunk, window=window), on_progress=progress.append)
        seconds = time.perf_counter() - began
    print(json.dumps({"seconds": seconds, "bytes": progress[-1].fetched_bytes,
                      "peak_growth_kib": status_kib("VmHWM:") - before}))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6])))
"""


def write_model(folder: Path, mb: int) -> Path:
    import torch
    from safetensors.torch import save_file

    hidden = 1024
    vocab = mb * (1 << 20) // (hidden * 4)
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab, hidden_size=hidden,
                  intermediate_size=256, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8,
                  max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True, torch_dtype="float32")
    (folder / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * 0.02,
               "model.norm.weight": torch.ones(hidden)}
    for name, shape in [("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden, hidden)),
                        ("self_attn.v_proj", (hidden, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                        ("mlp.gate_proj", (256, hidden)), ("mlp.up_proj", (256, hidden)), ("mlp.down_proj", (hidden, 256))]:
        tensors[f"model.layers.0.{name}.weight"] = torch.randn(*shape, generator=g) * 0.02
    for name in ("input_layernorm", "post_attention_layernorm"):
        tensors[f"model.layers.0.{name}.weight"] = torch.ones(hidden)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


async def run(args) -> dict:
    from swarm.model.store import weights_fingerprint
    from swarm.model.unitcache import HeldModel
    from swarm.runtime.holder import HolderServer, WeightsHolder

    with tempfile.TemporaryDirectory(prefix="swarm-bench-transfer-") as tmp:
        tmp = Path(tmp)
        (tmp / "model").mkdir()
        model = write_model(tmp / "model", args.mb)
        fp = weights_fingerprint(model)
        holder = WeightsHolder({fp: str(model)}, None, root=tmp / "holder")
        began = time.perf_counter()  # the holder's unit files, written before the clock of the transfer
        held = HeldModel(model, fp, "float32", None, root=tmp / "holder")
        sizes = [(await asyncio.to_thread(held.ensure, u)).size for u in range(3)]
        write_s = time.perf_counter() - began
        async with HolderServer(holder) as server:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", RECEIVE_SCRIPT, server.address, fp, "3", str(tmp / "receiver"),
                str(args.chunk_kib * 1024), str(args.window), stdout=subprocess.PIPE)
            out, _ = await proc.communicate()
        got = json.loads(out)
    return {"model_bytes": sum(sizes), "unit_bytes": sizes, "write_unit_files_s": round(write_s, 2),
            "chunk_bytes": args.chunk_kib * 1024, "window": args.window, "moved_bytes": got["bytes"],
            "seconds": round(got["seconds"], 3), "rate_MBps": round(got["bytes"] / got["seconds"] / 1e6, 1),
            "receiver_peak_growth_MB": round(got["peak_growth_kib"] * 1024 / 1e6, 1),
            "receiver_peak_growth_share": round(got["peak_growth_kib"] * 1024 / got["bytes"], 3),
            "load_avg_1m": os.getloadavg()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="MB of the embedding (the tied head is as large)")
    parser.add_argument("--chunk-kib", type=int, default=1024)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from swarm.secret import ENV_VARIABLE, SwarmSecret

    os.environ.setdefault(ENV_VARIABLE, SwarmSecret.new().join_code)  # encrypted, as a swarm is
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:28} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
