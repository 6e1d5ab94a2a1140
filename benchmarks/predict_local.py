"""Predicted against measured ms/token over peers on this machine (issue 26).

Starts N `swarm join --interface 127.0.0.1 --threads 1` peers together (as a new user
would), waits until all are announced, runs `swarm generate --interface 127.0.0.1 --json`
over them, and prints the planner's prediction beside the measurement: ms per decode
token and time to the first token. Then stops the peers it started.

    python benchmarks/predict_local.py                 # 3 peers, 64 tokens, a table
    python benchmarks/predict_local.py --json          # one JSON object
    python benchmarks/predict_local.py --peers 3 --tokens 96 --insecure

Needs a quiet machine for figures worth keeping (the load average is printed with them):
the profile is taken while nothing else runs, or marked under load (swarm/model/profile.py).
The run has a swarm secret of its own (a fresh SWARM_SECRET, and a temporary config folder
so nobody's stored secret is touched): other swarms on this loopback are heard and ignored.
Profiles go to the usual cache, so a second run reuses them as a user's second start would.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPT = "The three most useful things to know about pipelines are"
READY_TIMEOUT_S = 900.0  # first run: every peer profiles the model (one at a time)


def swarm(*args: str) -> list[str]:
    return [sys.executable, "-m", "swarm", *args]


def announced(names: set[str], secure: list[str], env: dict) -> set[str]:
    out = subprocess.run(swarm("peers", "--interface", "127.0.0.1", "--json", "--wait", "2", *secure),
                         capture_output=True, text=True, cwd=ROOT, env=env)
    try:
        peers = json.loads(out.stdout)["peers"]
    except (json.JSONDecodeError, KeyError):
        return set()
    return {p["name"] for p in peers} & names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens to generate")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--insecure", action="store_true", help="peers and source without a swarm secret")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    from swarm.secret import ENV_VARIABLE, SwarmSecret

    secure = ["--insecure"] if args.insecure else []
    tag = f"{os.getpid()}"
    names = {f"local-{i}-{tag}" for i in range(args.peers)}
    logs = Path(tempfile.mkdtemp(prefix="predict-local-"))
    env = {**os.environ, "XDG_CONFIG_HOME": str(logs / "config"), "PYTHONPATH": str(ROOT)}
    if not args.insecure:
        env[ENV_VARIABLE] = SwarmSecret.new().join_code
    procs = []
    try:
        for name in sorted(names):
            log = open(logs / f"{name}.log", "w")
            procs.append(subprocess.Popen(swarm("join", "--interface", "127.0.0.1", "--threads", "1", "--name", name,
                                                *secure), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while announced(names, secure, env) != names:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise SystemExit(f"peers did not all come up; logs in {logs}")
        load = os.getloadavg()
        run = subprocess.run(swarm("generate", "--interface", "127.0.0.1", "--threads", "1", "--json",
                                   "--prompt", args.prompt, "--max-new-tokens", str(args.tokens), *secure),
                             capture_output=True, text=True, cwd=ROOT, env=env)
        if run.returncode != 0:
            raise SystemExit(f"swarm generate failed:\n{run.stderr[-3000:]}")
        body = json.loads(run.stdout)
    finally:
        for p in procs:  # only the processes started here, by their handles
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    predicted, measured = body["predicted"], body["timings"]
    ratio = predicted["ms_per_token"] / measured["ms_per_token"] if measured["ms_per_token"] else float("nan")
    result = {
        "peers": args.peers, "new_tokens": len(body["token_ids"]), "prompt_tokens": body["prompt_tokens"],
        "plan": body["plan"], "predicted": predicted, "measured": measured,
        "predicted_over_measured_ms_per_token": round(ratio, 3), "within_20_percent": abs(ratio - 1) <= 0.2,
        "load_average_before": [round(x, 2) for x in load], "logs": str(logs),
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print("plan: " + ", ".join(f"{s['device']} [{s['start']}, {s['end']})" for s in body["plan"]))
    print(f"ms/token      predicted {predicted['ms_per_token']:8.2f}   measured {measured['ms_per_token']:8.2f}"
          f"   ratio {ratio:.2f}")
    print(f"first token s predicted {predicted['time_to_first_token_s']:8.4f}   "
          f"measured {measured['time_to_first_token_s']:8.4f}")
    print(f"predicted parts (ms/token): compute {predicted['compute_ms_per_token']}, "
          f"fixed per-step costs {predicted['overhead_ms_per_token']}, hops {predicted['hops_ms_per_token']}")
    print(f"load average before generating: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
