"""`swarm plan PROBLEM.json`: choose devices and split the model; print the plan."""

from __future__ import annotations

import argparse
import json
import sys

from swarm.planner import InfeasibleError, Plan, Problem, ProblemError, plan
from swarm.planner.problem import fmt_bytes
from swarm.planner.strategies import STRATEGIES, InvalidPlanError


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("plan", help="plan device selection and partition for a problem file",
                                   description=__doc__)
    parser.add_argument("problem", help="problem JSON (source, layers, devices, bandwidth, latency, return_bytes)")
    parser.add_argument("--objective", choices=("latency", "throughput", "cycle"), default="latency",
                        help="latency: least time per token; throughput: least bottleneck; "
                             "cycle: least max(R/m, P) with --inflight m micro-batches")
    parser.add_argument("--inflight", type=int, default=1, metavar="M", help="micro-batches in flight (default 1)")
    parser.add_argument("--strategy", choices=STRATEGIES, default=None, help="default: ours (exact)")
    parser.add_argument("--cloud", default=None, help="cloud device name for the cloud-edge strategies")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        with open(args.problem) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"swarm plan: cannot read {args.problem}: {e}", file=sys.stderr)
        return 2
    try:
        problem = Problem.from_json(data)
        options = {"cloud": args.cloud} if args.cloud is not None else {}
        result = plan(problem, args.objective, max(1, args.inflight), args.strategy, **options)
    except ProblemError as e:
        print(f"swarm plan: {args.problem}: {e}", file=sys.stderr)
        return 2
    except InvalidPlanError as e:
        print(f"swarm plan: {e}", file=sys.stderr)
        return 1
    except InfeasibleError as e:
        print(f"swarm plan: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"swarm plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_json(problem), indent=2))
    else:
        _print_table(problem, result)
    return 0


def _print_table(problem: Problem, p: Plan) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"plan: {p.strategy}, objective {p.objective} ({p.method or 'fixed'})")
    for col in ("stage", "device", "units (n)", "compute", "hop", "memory used / available"):
        table.add_column(col, justify="right" if col in ("stage", "compute", "hop") else "left")
    for k, s in enumerate(p.stages):
        layers = f"{s.start}-{s.end - 1} ({s.end - s.start})"
        hop = f"{p.hop_s[k] * 1e3:.2f} ms" + (" (return)" if k == len(p.stages) - 1 else "")
        fixed = p.overhead_s[k] if p.overhead_s else 0.0  # step constant and hop overhead (issue 26)
        compute = f"{p.compute_s[k] * 1e3:.2f} ms" + (f" + {fixed * 1e3:.2f} fixed" if fixed else "")
        table.add_row(str(k), problem.device_names[s.device], layers, compute, hop,
                      f"{fmt_bytes(p.mem_used[k])} / {fmt_bytes(problem.device_mem[s.device])}")
    console = Console()
    console.print(table)
    console.print(f"latency R = {p.latency_s * 1e3:.2f} ms/token, bottleneck P = {p.bottleneck_s * 1e3:.2f} ms, "
                  f"cycle max(R/{p.inflight}, P) = {p.cycle_s * 1e3:.2f} ms "
                  f"-> {1 / max(p.cycle_s, 1e-300):.2f} micro-batch steps/s (x b sequences each)")
    if p.gap > 0:
        console.print(f"bounded: within {p.gap:.2%} of the proven optimum bound")
    for note in p.notes:
        console.print(f"note: {note}")
