"""A model no single device here can hold: a Llama-3-8B-shaped Q4_0 GGUF over 3 local peers.

The file (random weights, ``big_gguf.py``; written once into the cache) is held by the
source only. Three ``swarm join`` peers start with empty caches and no ``--model``
(``--hold all`` gives each the file instead), each offering ``--mem`` below the model's
size, so the plan must spread the model over them and move the weights there. Then
``swarm generate`` over them, measured from the outside:

- cold start: from launching ``swarm generate`` to its first token (plan, transfer, load,
  prefill), and a second, warm run with the units cached;
- decode ms/token;
- each process's peak resident memory (VmHWM) beside the bytes the planner gave it;
- llama.cpp on the same file in one process, and over 3 ``ggml-rpc-server`` on this
  machine, in the same run when ``--llama-cpp BUILD/bin`` is given.

    python benchmarks/bench_big.py [--shape llama-8b] [--new-tokens 16] [--llama-cpp BUILD/bin] [--json]

Loopback only: mDNS and every socket are bound to 127.0.0.1. Every process computes
on one thread. The load average is printed beside the figures: take them alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.big_gguf import write_random_gguf  # noqa: E402
from swarm.model.checkpoint import open_checkpoint  # noqa: E402
from swarm.model.store import cache_root  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
PEERS = 3
JOIN_READY_S = 600.0  # profiling a big model's units at one thread takes a while


def vm_hwm_bytes(pid: int) -> int:
    """The process's peak resident set (VmHWM), or 0 once it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakWatcher:
    """Polls VmHWM of a process until it exits (the last value read is its peak)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, vm_hwm_bytes(self.pid))

    def stop(self) -> int:
        self.peak = max(self.peak, vm_hwm_bytes(self.pid))
        self._stop.set()
        self._thread.join()
        return self.peak


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def join_peers(model: Path, hold: str, mem: str, env: dict, logs: Path):
    """PEERS `swarm join` processes on 127.0.0.1, each with a cache of its own (empty)."""
    procs = []
    try:
        for i in range(PEERS):
            peer_env = {**env, "SWARM_CACHE_DIR": str(logs / f"peer-{i + 1}-cache")}
            cmd = [sys.executable, "-m", "swarm", "join", "--interface", "127.0.0.1", "--name", f"big-{i + 1}",
                   "--threads", "1", "--mem", mem, "--quant", "int4"]
            if hold == "all":
                cmd += ["--model", str(model)]
            log = open(logs / f"peer-{i + 1}.log", "w")
            procs.append((subprocess.Popen(cmd, env=peer_env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                           start_new_session=True), logs / f"peer-{i + 1}.log"))
        deadline = time.monotonic() + JOIN_READY_S
        for proc, path in procs:
            while "joined" not in path.read_text():
                if proc.poll() is not None:
                    raise RuntimeError(f"peer exited ({proc.returncode}):\n{path.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"peer not ready in {JOIN_READY_S} s:\n{path.read_text()[-3000:]}")
                time.sleep(0.5)
        yield [p for p, _ in procs]
    finally:
        for proc, _ in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def run_generate(model: Path, mem: str, new_tokens: int, env: dict, log: Path) -> dict:
    """`swarm generate` over the joined peers; wall time to its first token, its JSON, its peak RSS."""
    cmd = [sys.executable, "-m", "swarm", "generate", "--model", str(model), "--quant", "int4", "--interface",
           "127.0.0.1", "--threads", "1", "--mem", mem, "--prompt", PROMPT, "--max-new-tokens", str(new_tokens),
           "--json"]
    began = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO)
        watcher = PeakWatcher(proc.pid)
        out, _ = proc.communicate(timeout=3600)
        wall = time.perf_counter() - began
        peak = watcher.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"swarm generate failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    body = json.loads(out.strip().splitlines()[-1])
    t = body["timings"]
    return {"cold_start_to_first_token_s": round(wall - (t["total_s"] - t["time_to_first_token_s"]), 2),
            "ms_per_token": t["ms_per_token"], "plan": body["plan"], "predicted": body.get("predicted", {}),
            "token_ids": body["token_ids"], "peak_rss_bytes": peak, "wall_s": round(wall, 2)}


def planned_bytes(model: Path, plan: list[dict]) -> dict[str, int]:
    """The weight bytes the plan gives each device (int4: the file's Q4_0 blocks as they are)."""
    per_unit = open_checkpoint(model).layout.held_weight_bytes("float32", "int4")
    return {p["device"]: sum(per_unit[p["start"]:p["end"]]) for p in plan}


def llama_cpp(bin_dir: Path, model: Path, new_tokens: int) -> dict:
    """llama-bench in one process and over PEERS local RPC servers: decode ms/token."""
    bench = [str(bin_dir / "llama-bench"), "-m", str(model), "-t", "1", "-p", "32", "-n", str(new_tokens),
             "-r", "1", "-o", "jsonl"]
    results = {}

    def decode_ms(extra: list[str]) -> float:
        out = subprocess.run(bench + extra, capture_output=True, text=True, check=True, timeout=3600).stdout
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return round(1000 / next(r for r in rows if r["n_gen"] > 0)["avg_ts"], 1)

    results["one_process_ms_per_token"] = decode_ms([])
    ports = [free_port() for _ in range(PEERS)]
    servers = [subprocess.Popen([str(bin_dir / "ggml-rpc-server"), "-t", "1", "-H", "127.0.0.1", "-p", str(p)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for p in ports]
    try:
        time.sleep(2)
        results["rpc_3_servers_ms_per_token"] = decode_ms(["-rpc", ",".join(f"127.0.0.1:{p}" for p in ports)])
    finally:
        for s in servers:
            s.terminate()
            s.wait(10)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--gguf", type=Path, help="the model file (default: written once into the cache)")
    parser.add_argument("--hold", choices=("source", "all"), default="source",
                        help="who holds the file: the source only (weights travel) or every peer")
    parser.add_argument("--peer-mem", default=None, help="--mem of each peer (default: 40%% of the file)")
    parser.add_argument("--source-mem", default="1200M")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--llama-cpp", type=Path, help="llama.cpp's build/bin (llama-bench, ggml-rpc-server)")
    parser.add_argument("--keep", action="store_true", help="keep the logs and peer caches")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    model = args.gguf or cache_root() / "bench" / f"random-{args.shape}-Q4_0.gguf"
    if not model.exists():
        model.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {model} ...", file=sys.stderr)
        write_random_gguf(args.shape, "Q4_0", model)
    size = model.stat().st_size
    peer_mem = args.peer_mem or f"{int(size * 0.4 / 2**20)}M"
    logs = Path(tempfile.mkdtemp(prefix="swarm-bench-big-"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    load_before = os.getloadavg()
    result = {"shape": args.shape, "file": str(model), "file_bytes": size, "hold": args.hold,
              "peer_mem": peer_mem, "source_mem": args.source_mem, "new_tokens": args.new_tokens}
    try:
        with join_peers(model, args.hold, peer_mem, env, logs) as peers:
            print("peers joined; generating (cold) ...", file=sys.stderr)
            cold = run_generate(model, args.source_mem, args.new_tokens, env, logs / "generate-cold.log")
            print("generating again (units cached) ...", file=sys.stderr)
            warm = run_generate(model, args.source_mem, args.new_tokens, env, logs / "generate-warm.log")
            peer_peaks = {f"big-{i + 1}": vm_hwm_bytes(p.pid) for i, p in enumerate(peers)}
        result.update(cold=cold, warm=warm, peer_peak_rss_bytes=peer_peaks,
                      planned_weight_bytes=planned_bytes(model, cold["plan"]),
                      same_tokens_cold_warm=cold["token_ids"] == warm["token_ids"])
        if args.llama_cpp:
            print("llama.cpp ...", file=sys.stderr)
            result["llama_cpp"] = llama_cpp(args.llama_cpp, model, args.new_tokens)
    finally:
        result["load_average"] = {"before": [round(x, 2) for x in load_before],
                                  "after": [round(x, 2) for x in os.getloadavg()]}
        if args.keep:
            result["logs"] = str(logs)
        else:
            shutil.rmtree(logs, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return
    for key in ("cold", "warm"):
        r = result[key]
        print(f"{key}: first token {r['cold_start_to_first_token_s']} s after launch, {r['ms_per_token']} ms/token, "
              f"source peak {r['peak_rss_bytes'] / 2**30:.2f} GiB; plan {r['plan']}")
    print("planned weight bytes: " + ", ".join(f"{n} {b / 2**30:.2f} GiB"
                                               for n, b in result["planned_weight_bytes"].items()))
    print("peers' peak RSS: " + ", ".join(f"{n} {b / 2**30:.2f} GiB" for n, b in result["peer_peak_rss_bytes"].items()))
    if "llama_cpp" in result:
        print(f"llama.cpp: {result['llama_cpp']}")
    print(f"load average {result['load_average']}")


if __name__ == "__main__":
    main()
