"""Resident memory of a loaded shard per weight format, against the bytes the planner counts.

A model of a public shape (default: Llama 3.2 1B: 16 layers, hidden 2048, vocab
128256, tied head) with random bfloat16 weights is written once, layer by layer
(swarm.model.hf.save_random_checkpoint; never whole in memory). Each format is
then loaded in a fresh process; the process's resident-memory growth (VmRSS after
touching every weight, and the peak VmHWM during the load) is compared with the
planner's per-unit weight bytes (ModelLayout.unit_weight_bytes) for the same range.

    python benchmarks/bench_memory.py [--shape llama-1b] [--dir /tmp/swarm-llama-1b] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from swarm.model.units import ModelLayout

LOAD_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from swarm.model.shard import Shard, warm_up
quant = None if sys.argv[4] == "none" else sys.argv[4]
warm_up(sys.argv[1])  # imports and the kernel build done before measuring

def status_kib(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])

open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to now
before = status_kib("VmRSS:")
shard = Shard.load(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), max_slots=1, max_len=8, quant=quant)
for t in shard.weights.tensors():  # touch every page
    t.view(-1)[::1024].float().sum()
print(json.dumps({"rss_kib": status_kib("VmRSS:") - before, "peak_kib": status_kib("VmHWM:") - before,
                  "weight_bytes": shard.weight_bytes}))
"""


def measure(model_dir: Path, start: int, end: int, quant: str) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(model_dir), str(start), str(end), quant],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-1b")
    parser.add_argument("--dir", type=Path, default=None, help="where the random checkpoint is (made if missing)")
    parser.add_argument("--formats", default="none,int8,int4")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model_dir = args.dir or Path(f"/tmp/swarm-{args.shape}")
    if not (model_dir / "config.json").exists():
        from swarm.model import hf

        print(f"writing a random {args.shape} checkpoint to {model_dir} ...", file=sys.stderr)
        hf.save_random_checkpoint(model_dir, args.shape)
    layout = ModelLayout.read(model_dir)
    n = layout.num_units
    ranges = {"whole": (0, n), "blocks": (1, n - 1)}
    rows = []
    for quant in args.formats.split(","):
        planned = layout.unit_weight_bytes("float32", None if quant == "none" else quant)
        for what, (a, b) in ranges.items():
            m = measure(model_dir, a, b, quant)
            # The planner counts a tied head's copy apart (the head may sit on another peer); one
            # shard holding both keeps one copy (float32: the same tensor; quantized: the int8 embedding).
            shared = planned[0] if what == "whole" and layout.tied_embeddings else 0
            counted = sum(planned[a:b]) - shared
            rows.append({"format": quant, "range": what, "units": [a, b], "rss_bytes": m["rss_kib"] * 1024,
                         "peak_bytes": m["peak_kib"] * 1024, "weight_bytes": m["weight_bytes"],
                         "planner_bytes": sum(planned[a:b]), "planner_bytes_shared_head": counted,
                         "rss_over_planner": round(m["rss_kib"] * 1024 / counted, 3)})
    base = {r["range"]: r["rss_bytes"] for r in rows if r["format"] == "none"}
    for r in rows:
        r["rss_vs_float32"] = round(r["rss_bytes"] / base[r["range"]], 3) if r["range"] in base else None
    if args.json:
        print(json.dumps({"model": args.shape, "params_per_unit": layout.unit_param_counts()[:2], "rows": rows}))
        return
    print(f"{args.shape}: resident memory of a loaded shard vs the planner's bytes")
    for r in rows:
        print(f"  {r['format']:5s} {r['range']:6s} rss {r['rss_bytes'] / 1e9:6.3f} GB  peak {r['peak_bytes'] / 1e9:6.3f} GB  "
              f"planner {r['planner_bytes_shared_head'] / 1e9:6.3f} GB  rss/planner {r['rss_over_planner']:.3f}  "
              f"rss/float32 {r['rss_vs_float32']}")


if __name__ == "__main__":
    main()
