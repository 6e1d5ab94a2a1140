"""`swarm bench --json` runs end to end (tiny model, few tokens) and prints the agreed keys."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bench_json_has_the_agreed_keys(tiny_model_dir):
    out = subprocess.run(
        [sys.executable, "benchmarks/bench_pipeline.py", "--model", str(tiny_model_dir), "--json",
         "--prompt-tokens", "8", "--new-tokens", "8", "--repeats", "1", "--micro-batches", "2", "--no-recovery"],
        capture_output=True, text=True, timeout=600, check=True,
    )
    result = json.loads(out.stdout)
    assert result["single_process_ms_per_token"] > 0 and result["sequential_ms_per_token"] > 0
    assert isinstance(result["hop_overhead_ms"], float)
    if result["one_core"] is not None:  # pinning needs Linux and two CPUs
        assert result["one_core"]["sequential_ms_per_token"] > 0
    (row,) = result["pipeline"]
    assert row["m"] == 2
    assert all(row[k] > 0 for k in ("no_bubbles_tok_s", "bubbles_tok_s", "simulated_tok_s"))
    e = result["encryption"]  # the same chain and pipeline over CURVE peers and --insecure peers
    assert e["m"] == 2 and e["repeats"] == 1
    assert all(e[k] > 0 for k in ("sequential_ms_per_token_on", "sequential_ms_per_token_off",
                                  "pipelined_tok_s_on", "pipelined_tok_s_off"))


def test_zmq_ring_floor_runs_and_reports_per_hop_figures():
    out = subprocess.run(
        [sys.executable, "benchmarks/zmq_ring.py", "--json", "--processes", "3", "--compute-ms", "2",
         "--stream-mb", "8", "--rounds", "20", "--repeats", "2"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    result = json.loads(out.stdout)
    assert result["processes"] == 3 and len(result["hop_ms"]) == 2
    # Each round is 3 x 2 ms of work plus 3 hops: a hop costs something, and far less than the work.
    assert 0 < result["hop_ms_median"] < 50

