"""The paper's experiments through the real swarm on an emulated home network.

    sudo .venv/bin/python benchmarks/testbed.py [--scenario home] [--repeats 3] [--json] [--plots docs/img/testbed]

Brings the scenario up (bootstrap/netns/homenet.py: namespaces, shaped links, CPU
quotas, peers that profile themselves), starts the source in its namespace, and for
every bandwidth of the scenario's sweep (the source-cloud link, as in the paper's
Figures 7-8) plans each strategy on the links and devices as measured, deploys
exactly that plan, generates (prompt 32, 96 new tokens) and compares with the
prediction for the same plan:

- latency (one sequence): Edge-Solo, Cloud-Edge-Even, Cloud-Edge-Opt, EdgeShard-Even,
  EdgeShard (latency objective), and EdgeShard planned on prefill-only and
  decode-only profiles (the paper's Figure 10);
- throughput (the scenario's `sequences` in flight, one per micro-batch): the same
  baselines on their throughput plans, EdgeShard throughput with No-Bubbles and with
  Bubbles, and ours (cycle objective).

The prediction is swarm.planner.simulate's event simulation of the plan: per-stage
decode and prefill times from the devices' own profiles plus each device's fixed
per-step costs (its step constant and, in a plan of two or more stages, its hop
overhead: issue 26), hops from the measured bandwidth and round trip. The latency
rows include "EdgeShard (issue-3 model)": the plan the model before issue 26 picks
(mean of prefill and decode, no fixed costs), measured in the same run. Runs are interleaved across repeats (rotated order) and
medians reported, each with the load average and every cgroup's throttling counters
over the run, so contention on a shared machine shows as a measured reason.
Ctrl-C tears everything down.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bootstrap.netns.homenet import Homenet, Scenario, SourceAgent, cannot_run, cgroup_pids, cpu_stat  # noqa: E402
from swarm.planner.exact import plan_ours  # noqa: E402
from swarm.planner.plan import Plan  # noqa: E402
from swarm.planner.problem import InfeasibleError, Problem  # noqa: E402
from swarm.planner.simulate import simulate_pipeline  # noqa: E402
from swarm.planner.strategies import run_strategy  # noqa: E402

MBIT = 1e6 / 8
TOLERANCE = 0.15


# ---------------------------------------------------------------- cases and predictions (pure)

@dataclass(frozen=True)
class Case:
    strategy: str
    kind: str  # "latency" (one sequence) or "throughput" (sequences in flight)
    plan: Plan
    micro_batches: int
    mode: str = "no-bubbles"

    def key(self) -> tuple:
        return (tuple((s.device, s.start, s.end) for s in self.plan.stages), self.micro_batches, self.mode)


def with_times(problem: Problem, times: list[list[float]]) -> Problem:
    data = problem.to_json()
    for dev, t in zip(data["devices"], times):
        dev["time"] = t
    return Problem.from_json(data)


def build_cases(problem: Problem, unit_times: list[dict], sequences: int, cloud: str | None) -> list[Case]:
    """Every strategy's plan on the measured problem (decode times and fixed per-step costs, issue 26)."""
    cases: list[Case] = []

    def add(strategy: str, kind: str, make, m: int = 1, mode: str = "no-bubbles") -> None:
        try:
            cases.append(Case(strategy, kind, make(), m, mode))
        except (InfeasibleError, ValueError) as exc:
            print(f"  {strategy}: no plan ({exc})", file=sys.stderr)

    for kind, objective, m in (("latency", "latency", 1), ("throughput", "throughput", sequences)):
        add("Edge-Solo", kind, lambda: run_strategy(problem, "edge-solo", objective, m), m)
        add("Cloud-Edge-Even", kind, lambda: run_strategy(problem, "cloud-edge-even", objective, m, cloud=cloud), m)
        add("Cloud-Edge-Opt", kind, lambda: run_strategy(problem, "cloud-edge-opt", objective, m, cloud=cloud), m)
        add("EdgeShard-Even", kind, lambda: run_strategy(problem, "even", objective, m), m)
    add("EdgeShard", "latency", lambda: plan_ours(problem, "latency"))
    prefill = with_times(problem, [u["prefill_s"] for u in unit_times])
    decode = with_times(problem, [u["decode_s"] for u in unit_times])
    add("EdgeShard (prefill profile)", "latency", lambda: evaluate_on(problem, plan_ours(prefill, "latency")))
    add("EdgeShard (decode profile)", "latency", lambda: evaluate_on(problem, plan_ours(decode, "latency")))
    add("EdgeShard (issue-3 model)", "latency", lambda: evaluate_on(problem, plan_ours(issue3_model(problem, unit_times),
                                                                                       "latency")))
    throughput = plan_ours(problem, "throughput", sequences)
    cases.append(Case("EdgeShard No-Bubbles", "throughput", throughput, sequences, "no-bubbles"))
    cases.append(Case("EdgeShard Bubbles", "throughput", throughput, sequences, "bubbles"))
    add("ours (cycle)", "throughput", lambda: plan_ours(problem, "cycle", sequences), sequences)
    return cases


def issue3_model(problem: Problem, unit_times: list[dict]) -> Problem:
    """The problem as the planner saw it before issue 26: mean of prefill and decode per unit, no
    fixed per-step costs (the plan it picks is measured beside the extended model's)."""
    data = with_times(problem, [[(p + d) / 2 for p, d in zip(u["prefill_s"], u["decode_s"])]
                                for u in unit_times]).to_json()
    for dev in data["devices"]:
        dev["step_overhead"] = dev["hop_overhead"] = 0.0
    return Problem.from_json(data)


def evaluate_on(problem: Problem, plan: Plan) -> Plan:
    from swarm.planner.plan import evaluate

    return evaluate(problem, plan.stages, plan.inflight, objective=plan.objective, strategy=plan.strategy)


def predict(case: Case, problem: Problem, unit_times: list[dict], prompt_tokens: int, new_tokens: int,
            prefill_tokens: int = 32) -> dict:
    """The simulator's figures for this plan: decode and prefill stage times from the profiles,
    hops from the measured links (one token's activation per step, the prompt's at prefill)."""
    stages = case.plan.stages
    hops = problem.hop_time(0.0)  # latency only; bytes added below
    fixed = problem.stage_overhead() if len(stages) > 1 else problem.step_overhead  # occupies the stage
    decode_stage = [sum(unit_times[s.device]["decode_s"][s.start:s.end]) + fixed[s.device] for s in stages]
    prefill_stage = [sum(unit_times[s.device]["prefill_s"][s.start:s.end]) * prompt_tokens / prefill_tokens
                     + fixed[s.device] for s in stages]

    def hop_times(tokens: int) -> list[float]:
        out = []
        for k, s in enumerate(stages):
            nxt = stages[k + 1].device if k + 1 < len(stages) else problem.source
            payload = problem.layer_out[s.end - 1] * tokens if k + 1 < len(stages) else problem.return_bytes
            if nxt == s.device:
                out.append(0.0)
                continue
            out.append(float(hops[s.device, nxt] + payload / problem.bandwidth[s.device, nxt]))
        return out

    sim = simulate_pipeline(decode_stage, hop_times(1), m=case.micro_batches, b=1, barrier=case.mode == "bubbles",
                            input_tokens=prompt_tokens, generated_tokens=new_tokens,
                            prefill_stage_times_s=prefill_stage, prefill_hop_times_s=hop_times(prompt_tokens))
    return {"ms_per_token": sim.round_trip_s * 1e3, "tokens_per_s": sim.tokens_per_s,
            "hops_ms_per_token": sum(hop_times(1)) * 1e3, "compute_ms_per_token": sum(decode_stage) * 1e3,
            "fixed_ms_per_token": sum(float(fixed[s.device]) for s in stages) * 1e3,
            "first_token_s": sum(prefill_stage) + sum(hop_times(prompt_tokens)),
            "busy_share": list(sim.busy_share), "planner_latency_ms": case.plan.latency_s * 1e3,
            "planner_cycle_ms": case.plan.cycle_s * 1e3}


def describe(plan: Plan, names: list[str]) -> str:
    return " ".join(f"{names[s.device]}[{s.start},{s.end})" for s in plan.stages)


# ---------------------------------------------------------------- measuring

def cgroup_usage(net: Homenet) -> dict[str, dict]:
    """Per device: the cgroup's throttling counters and the CPU seconds its processes used."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for d in net.scenario.devices:
        stat = cpu_stat(net.cgroup(d.name))
        used = 0.0
        for pid in cgroup_pids(net.cgroup(d.name)):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                used += (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError):
                pass
        out[d.name] = {"nr_periods": stat.get("nr_periods", 0), "nr_throttled": stat.get("nr_throttled", 0),
                       "cpu_s": used}
    return out


def usage_delta(before: dict, after: dict, wall_s: float) -> dict:
    out = {}
    for name in before:
        periods = after[name]["nr_periods"] - before[name]["nr_periods"]
        out[name] = {"throttled_share": (after[name]["nr_throttled"] - before[name]["nr_throttled"]) / periods
                     if periods else 0.0,
                     "cpu_share": (after[name]["cpu_s"] - before[name]["cpu_s"]) / wall_s}
    return out


def run_case(agent: SourceAgent, net: Homenet, case: Case, ids: list[str], prompt_tokens: int, new_tokens: int) -> dict:
    stages = [[None if k == 0 else ids[s.device], s.start, s.end] for k, s in enumerate(case.plan.stages)]
    load_before = os.getloadavg()[0]
    before = cgroup_usage(net)
    began = time.perf_counter()
    answer = agent.ask(op="run", stages=stages, micro_batches=case.micro_batches, batch_size=1, mode=case.mode,
                       prompt_tokens=prompt_tokens, new_tokens=new_tokens)
    wall = time.perf_counter() - began
    return {"ms_per_token": statistics.median(answer["decode_s_per_token"]) * 1e3,
            "tokens_per_s": answer["tokens_per_s"], "first_token_s": statistics.median(answer["first_token_s"]),
            "busy_share": answer["busy_share"], "load": [load_before, os.getloadavg()[0]],
            "cgroups": usage_delta(before, cgroup_usage(net), wall), "elapsed_s": answer["elapsed_s"]}


def measure_setting(agent: SourceAgent, net: Homenet, mbit: float, repeats: int, workload: dict, say) -> dict:
    scenario = net.scenario
    for a, b in scenario.sweep_links:
        net.shape(a, b, mbit)
    names = {agent.peer_id: scenario.source.name, **{pid: n for n, pid in net.peer_ids.items()}}
    answer = agent.ask(op="problem")
    data = answer["problem"]
    ids = data["peer_ids"]
    dev_names = [names[pid] for pid in ids]
    data["devices"] = [{**d, "name": n} for d, n in zip(data["devices"], dev_names)]
    # Plan and predict with the rates the testbed enforces (a bulk transfer through the shaping
    # measures them within 4%); what the source's probes measured is kept beside them: at a few
    # Mbit/s under a CPU quota they scatter (docs/testbed.md), and the cost model is what is tested.
    measured_mbit = [[b / MBIT for b in row] for row in data["bandwidth"]]
    shaped = {**scenario.rates, **{pair: mbit for pair in scenario.sweep_links}}
    data["bandwidth"] = [[0.0 if i == j else shaped[(u, v)] * MBIT for j, v in enumerate(dev_names)]
                         for i, u in enumerate(dev_names)]
    problem = Problem.from_json(data)
    unit_times = [answer["unit_times"][pid] for pid in ids]
    cloud = "cloud" if "cloud" in dev_names else None
    sequences = int(workload.get("sequences", 4))
    cases = build_cases(problem, unit_times, sequences, cloud)
    prompt, new = int(workload.get("prompt_tokens", 32)), int(workload.get("new_tokens", 96))
    # Throughput runs keep `sequences` in flight; on a shared 2-vCPU machine each of those
    # tokens costs seconds, so the scenario may shorten them (the steady rate is the same).
    new_for = {"latency": new, "throughput": int(workload.get("throughput_new_tokens", new))}
    distinct = list(dict.fromkeys(c.key() for c in cases))
    runs: dict[tuple, list[dict]] = {k: [] for k in distinct}
    total, done, began = repeats * len(distinct), 0, time.monotonic()
    say(f"{mbit:g} Mbit/s: {len(cases)} cases, {len(distinct)} distinct deployments x {repeats} repeats")
    for r in range(repeats):
        order = distinct[r % len(distinct):] + distinct[:r % len(distinct)]  # interleave: rotate per repeat
        for key in order:
            case = next(c for c in cases if c.key() == key)
            run = run_case(agent, net, case, ids, prompt, new_for[case.kind])
            runs[key].append(run)
            done += 1
            eta = (time.monotonic() - began) / done * (total - done)
            say(f"  [{done}/{total}] {describe(case.plan, dev_names)} m={case.micro_batches} {case.mode}: "
                f"{run['ms_per_token']:.0f} ms/token, {run['tokens_per_s']:.2f} tok/s, "
                f"load {run['load'][1]:.1f} (eta {eta / 60:.1f} min)")
    rows = []
    for case in cases:
        measured = runs[case.key()]
        pred = predict(case, problem, unit_times, prompt, new_for[case.kind])
        med = {k: statistics.median(r[k] for r in measured) for k in ("ms_per_token", "tokens_per_s", "first_token_s")}
        busy = [statistics.median(r["busy_share"][k] for r in measured) for k in range(len(case.plan.stages))]
        throttled = {n: statistics.median(r["cgroups"][n]["throttled_share"] for r in measured)
                     for n in measured[0]["cgroups"]}
        cpu = {n: statistics.median(r["cgroups"][n]["cpu_share"] for r in measured) for n in measured[0]["cgroups"]}
        rows.append({"strategy": case.strategy, "kind": case.kind, "mode": case.mode,
                     "micro_batches": case.micro_batches, "plan": describe(case.plan, dev_names),
                     "devices": [dev_names[s.device] for s in case.plan.stages],
                     "predicted": pred,
                     # one sequence: the part of a token's time no stage was computing (hops, wake-ups)
                     "measured": {**med, "busy_share": busy,
                                  "not_computing_ms_per_token": med["ms_per_token"] * max(0.0, 1 - sum(busy))},
                     "load": statistics.median(r["load"][1] for r in measured), "throttled_share": throttled,
                     "cpu_share": cpu, "runs": measured})
    return {"mbit": mbit, "problem": problem.to_json(), "devices": dev_names, "probed_mbit": measured_mbit,
            "rows": rows}


def error(row: dict) -> float:
    key = "ms_per_token" if row["kind"] == "latency" else "tokens_per_s"
    return row["measured"][key] / row["predicted"][key] - 1


def report(results: dict) -> str:
    lines = [f"scenario {results['scenario']}: {results['about']}", ""]
    for setting in results["settings"]:
        lines.append(f"source-cloud {setting['mbit']:g} Mbit/s")
        lines.append(f"  {'strategy':30s} {'plan':48s} {'predicted':>11s} {'measured':>11s} {'diff':>6s}  load")
        for row in setting["rows"]:
            unit, key, fmt = (("ms/tok", "ms_per_token", "{:.0f}") if row["kind"] == "latency"
                              else ("tok/s", "tokens_per_s", "{:.2f}"))
            name = row["strategy"] + ("" if row["kind"] == "latency" else " [tput]")
            lines.append(f"  {name:30s} {row['plan'][:48]:48s} {fmt.format(row['predicted'][key]):>7s} {unit:3s} "
                         f"{fmt.format(row['measured'][key]):>7s} {unit:3s} {error(row):+6.0%}  {row['load']:.1f}")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default="home", help="peers/scenarios/NAME.json (default home)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats per deployment (medians reported)")
    p.add_argument("--mbit", type=float, action="append", help="bandwidths of the swept links (default: the scenario's)")
    p.add_argument("--new-tokens", type=int, help="generated tokens per sequence (default: the scenario's, 96)")
    p.add_argument("--tag", help="homenet tag (default tb-<scenario>)")
    p.add_argument("--reprofile", action="store_true", help="let every device profile itself again")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--out", type=Path, help="also write the JSON results here")
    p.add_argument("--plots", type=Path, help="write the figures (PNG) into this folder (needs matplotlib)")
    args = p.parse_args()
    reason = cannot_run()
    if reason:
        print(f"testbed: {reason}", file=sys.stderr)
        return 2
    scenario = Scenario.load(args.scenario)
    workload = dict(scenario.workload)
    if args.new_tokens:
        workload["new_tokens"] = args.new_tokens

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def interrupted(signum, frame):  # `kill`: tear down as for Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)  # also when started in the background (SIGINT ignored there)
    net = Homenet(scenario, args.tag or f"tb-{scenario.name}", python=sys.executable, log=say)
    results = {"scenario": scenario.name, "about": "", "workload": workload, "repeats": args.repeats,
               "settings": [], "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    results["about"] = json.loads(Path(REPO / "peers" / "scenarios" / f"{scenario.name}.json").read_text())["about"]
    say(f"bringing up {scenario.name} ({', '.join(f'{d.name} {d.cpus:g} cpu' for d in scenario.devices)}) ...")
    agent, finished = None, False
    try:
        net.up(reprofile=args.reprofile)
        agent = SourceAgent(net, net.work_dir() / "source.log")
        say(f"source {agent.peer_id} ready; load {os.getloadavg()[0]:.1f}")
        for mbit in args.mbit or scenario.sweep_mbit or [None]:
            results["settings"].append(measure_setting(agent, net, mbit, args.repeats, workload, say))
            if args.out:  # after every setting: an interrupted run keeps what it measured
                args.out.write_text(json.dumps(results, indent=1))
        finished = True
    finally:
        if agent is not None:
            agent.close(30.0 if finished else 3.0)
        removed = net.down()
        say(f"torn down: {len(removed)} namespaces and cgroups removed")
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    if args.plots:
        from benchmarks.testbed_plots import plot_all

        for path in plot_all(results, args.plots):
            say(f"wrote {path}")
    print(json.dumps(results) if args.json else report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
