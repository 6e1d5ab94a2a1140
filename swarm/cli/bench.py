"""`swarm bench`: the pipeline against the single-process shard path, measured side by side;
and recovery from a peer lost mid-answer, killed (SIGKILL) or frozen (SIGSTOP): loss to
next token, split into detection, re-plan + deploy and replay."""

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
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--no-recovery", action="store_true", help="skip the recovery measurement")
    which.add_argument("--only-recovery", action="store_true", help="measure recovery only")
    which.add_argument("--encryption-only", action="store_true",
                       help="only compare encryption on (CURVE) and off (--insecure) over the same plans")
    parser.add_argument("--heartbeat", type=float, default=None,
                        help="heartbeat interval of the recovery runs (default: the swarm's, 1.0 s)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from swarm.cli.common import resolve_model_or_exit
    from swarm.bench.pipeline import BenchConfig, run_bench, run_encryption_bench

    err = Console(stderr=True)
    model_dir = resolve_model_or_exit(args.model, err)
    config = BenchConfig(Path(model_dir), args.prompt_tokens, args.new_tokens, args.repeats,
                         micro_batches=tuple(args.micro_batches))
    result = recovery = encryption = None
    with err.status("starting local peers...") as status:
        def report(line: str) -> None:
            err.print(line, style="dim", highlight=False)
            status.update("measuring (keep the machine otherwise idle)...")

        if args.encryption_only:
            encryption = run_encryption_bench(config, report)
        elif not args.only_recovery:
            result = run_bench(config, report)
            encryption = result.encryption
        if not (args.no_recovery or args.encryption_only):
            from swarm.discovery.liveness import LivenessConfig
            from swarm.bench.recovery import run_recovery_bench

            status.update("measuring recovery from a killed peer...")
            liveness = LivenessConfig() if args.heartbeat is None else LivenessConfig(interval_s=args.heartbeat)
            recovery = run_recovery_bench(Path(model_dir), args.repeats, args.prompt_tokens, args.new_tokens,
                                          liveness, report)
    if args.json:
        body = result.to_json() if result is not None else {}
        if encryption is not None:
            body["encryption"] = asdict(encryption)
        if recovery is not None:
            body["recovery"] = recovery.to_json()
        print(json.dumps(body, indent=2))
        return 0
    if recovery is not None:
        v = recovery
        print(f"recovery            {v.kill_to_next_token_s:8.2f} s kill to next token (median of {len(v.runs)}): "
              f"detection {v.detection_s:.2f} s (bound {v.heartbeat_bound_s:.2f} s), re-plan + deploy "
              f"{v.replan_deploy_s:.2f} s, replay {v.replay_s:.2f} s; detection to next token "
              f"{v.detection_to_next_token_s:.2f} s (target: kill to next token <= 1 s)")
        print(f"frozen peer         {v.frozen_to_next_token_s:8.2f} s SIGSTOP to next token: detection "
              f"{v.frozen_detection_s:.2f} s, then {v.frozen_detection_to_next_token_s:.2f} s "
              f"(target <= bound + 1 s = {v.heartbeat_bound_s + 1:.2f} s)")
    if result is None:
        if encryption is not None:
            print_encryption(encryption)
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
