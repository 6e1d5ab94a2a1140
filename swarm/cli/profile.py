"""`swarm profile`: measure this device for a model and write the profile JSON.

Per unit: prefill time (32-token prompt), decode time (one token over a ~100-token
KV cache) and their average, weight bytes, KV bytes per token, bytes sent at a cut
after it; plus the device's usable memory. Cached per device and model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from swarm.cli.common import check_device, resolve_model_or_exit, unit_progress
from swarm.cli.options import (add_device_options, add_memory_option, add_model_option, add_quant_option,
                              add_threads_option, dtype_from)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("profile", help="measure this device for a model", description=__doc__)
    add_model_option(parser)
    add_threads_option(parser)
    add_device_options(parser)
    add_quant_option(parser)
    add_memory_option(parser, help="cap the memory this device offers (e.g. 2G)")
    parser.add_argument("--out", type=Path, default=None, help="also write the profile JSON here")
    parser.add_argument("--refresh", action="store_true", help="measure again even if a cached profile exists")
    parser.add_argument("--json", action="store_true", help="print the profile JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from swarm.model.profile import profile_cache_path, profile_device

    check_device(args.device)
    console = Console(highlight=False)
    err_console = Console(stderr=True)
    model_dir = resolve_model_or_exit(args.model, err_console)
    dtype = dtype_from(args)
    with unit_progress(err_console, "profiling") as on_unit:
        profile = profile_device(model_dir, threads=args.threads, dtype=dtype, device=args.device, quant=args.quant,
                                 mem_limit=args.mem, use_cache=not args.refresh, on_unit=on_unit)
    data = profile.to_json()
    cached = profile_cache_path(profile.device.name, profile.model.fingerprint, dtype, args.threads, args.device,
                                profile.kernels)
    if args.out:
        args.out.write_text(json.dumps(data, indent=1))
    if args.json:
        print(json.dumps(data))
        return 0
    table = Table(title=f"{profile.model.name} on {profile.device.name}, {args.threads} thread(s), {dtype}"
                  + (f", {args.quant} weights" if args.quant else "") + f", kernels {profile.kernels}")
    for column in ("unit", "prefill ms", "decode ms", "avg ms", "weights MB", "KV B/token", "out B/token"):
        table.add_column(column, justify="left" if column == "unit" else "right")
    for u in profile.units:
        table.add_row(u.name, f"{u.prefill_s * 1e3:.2f}", f"{u.decode_s * 1e3:.3f}", f"{u.time_s * 1e3:.2f}",
                      f"{u.weight_bytes / 1e6:.1f}", str(u.kv_bytes_per_token), str(u.out_bytes_per_token))
    console.print(table)
    total_decode = sum(u.decode_s for u in profile.units)
    total_prefill = sum(u.prefill_s for u in profile.units)
    console.print(f"whole model: prefill {total_prefill * 1e3:.1f} ms for {profile.prefill_tokens} tokens, "
                  f"decode {total_decode * 1e3:.1f} ms/token; weights {sum(u.weight_bytes for u in profile.units) / 1e6:.0f} MB; "
                  f"usable memory {profile.device.mem_bytes / 1e9:.2f} GB")
    console.print(f"times in a shard (blocks measured back to back); per-step constant "
                  f"{profile.step_decode_s * 1e3:.3f} ms decode, {profile.step_prefill_s * 1e3:.3f} ms prefill")
    if profile.under_load:
        console.print(f"[yellow]measured while other processes kept {profile.others_busy_cpus:.1f} CPUs busy: "
                      "the times may be slow (measured again once this device is quiet, or --refresh)[/yellow]")
    console.print(f"measured in {profile.measured_s:.1f} s; profile JSON: {args.out or cached}")
    return 0
