"""`swarm bench`: the pipeline against the single-process shard path, measured side by side."""

from __future__ import annotations

import argparse
import json
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
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from swarm.cli.common import resolve_model_or_exit
    from swarm.runtime.bench import BenchConfig, run_bench

    err = Console(stderr=True)
    model_dir = resolve_model_or_exit(args.model, err)
    config = BenchConfig(Path(model_dir), args.prompt_tokens, args.new_tokens, args.repeats,
                         micro_batches=tuple(args.micro_batches))
    with err.status("starting 3 local peers...") as status:
        def report(line: str) -> None:
            err.print(line, style="dim", highlight=False)
            status.update("measuring (keep the machine otherwise idle)...")

        result = run_bench(config, report)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
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
    return 0
