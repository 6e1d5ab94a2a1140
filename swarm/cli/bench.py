"""`swarm bench`: the pipeline against the single-process shard path, measured side by side."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from swarm.cli.options import add_model_option


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench", help="benchmark the pipeline against the single-process path",
                                   description=__doc__.splitlines()[0])
    add_model_option(parser)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5, help="runs per configuration (medians are reported)")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--encryption-only", action="store_true",
                        help="only compare encryption on (CURVE) and off (--insecure) over the same plans")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from swarm.cli.common import resolve_model_or_exit
    from swarm.runtime.bench import BenchConfig, run_bench, run_encryption_bench

    err = Console(stderr=True)
    model_dir = resolve_model_or_exit(args.model, err)
    config = BenchConfig(Path(model_dir), args.prompt_tokens, args.new_tokens, args.repeats,
                         micro_batches=tuple(args.micro_batches))
    with err.status("starting local peers...") as status:
        def report(line: str) -> None:
            err.print(line, style="dim", highlight=False)
            status.update("measuring (keep the machine otherwise idle)...")

        if args.encryption_only:
            figures = run_encryption_bench(config, report)
        else:
            result = run_bench(config, report)
            figures = result.encryption
    if args.json:
        print(json.dumps({"encryption": asdict(figures)} if args.encryption_only else result.to_json(), indent=2))
        return 0
    if args.encryption_only:
        print_encryption(figures)
        return 0
    r = result
    print(f"single process      {r.single_process_ms_per_token:8.2f} ms/token")
    print(f"3 peers, sequential {r.sequential_ms_per_token:8.2f} ms/token  "
          f"({r.sequential_over_single:.3f}x, target <= 1.10x)")
    print(f"overhead per hop    {r.hop_overhead_ms:8.3f} ms  "
          f"({r.hops} hops; wire and scheduling alone {r.transport_ms_per_hop:.3f} ms; "
          f"probe {r.probe_hop_ms:.3f} ms; target <= 0.5 ms)")
    if r.one_core is not None:
        c = r.one_core
        print(f"  every process on one core: single {c.single_process_ms_per_token:.2f} ms/token, sequential "
              f"{c.sequential_ms_per_token:.2f} ms/token ({c.sequential_over_single:.3f}x), per hop "
              f"{c.hop_overhead_ms:.3f} ms (wire and scheduling {c.transport_ms_per_hop:.3f} ms)")
    print(f"2 stages, cut at unit {r.two_stage_cut}: stage steps {', '.join(f'{t:.2f}' for t in r.stage_step_ms)} ms, "
          f"hop {r.hop_ms:.2f} ms, m=1 {r.two_stage_m1_ms_per_token:.2f} ms/token")
    for p in r.pipeline:
        print(f"  m={p.m}: No-Bubbles {p.no_bubbles_tok_s:6.1f} tok/s, Bubbles {p.bubbles_tok_s:6.1f} tok/s "
              f"({p.no_bubbles_over_bubbles:.2f}x, target >= 1.3x), simulated {p.simulated_tok_s:6.1f} tok/s "
              f"({p.no_bubbles_over_simulated:.0%}, target >= 85%)")
    print_encryption(r.encryption)
    return 0


def print_encryption(e) -> None:
    print(f"encryption on vs off ({e.repeats} interleaved pairs, target: on <= 3% slower)")
    print(f"  sequential  on {e.sequential_ms_per_token_on:8.2f} ms/token, off {e.sequential_ms_per_token_off:8.2f} "
          f"ms/token: on is {e.sequential_slowdown:+.1%}")
    print(f"  2 stages m={e.m} on {e.pipelined_tok_s_on:8.1f} tok/s,   off {e.pipelined_tok_s_off:8.1f} tok/s:   "
          f"on is {e.pipelined_slowdown:+.1%}")
