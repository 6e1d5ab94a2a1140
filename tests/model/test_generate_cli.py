"""`swarm generate` from the command line: the same tokens as transformers, in this process and over a local swarm."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from swarm.model import hf
from tests.model.reference import reference_generate

pytestmark = pytest.mark.slow  # the real default model, and peer processes

PROMPTS = ["The capital of France is", "1, 2, 3, 4,"]


def swarm_generate(*args: str) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "swarm", "generate", "--json", "--max-new-tokens", "24", *args],
                          capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def expected(smollm2_dir):
    tokenizer = hf.load_tokenizer(smollm2_dir)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    return reference_generate(smollm2_dir, prompts, 24)


def test_in_process_answer_is_generates(expected):
    out = swarm_generate("--prompt", PROMPTS[0])
    # generate stops at the end-of-sequence token; the reference was asked for exactly 24
    assert out["token_ids"] == expected[0][: len(out["token_ids"])] and len(out["token_ids"]) > 4
    assert out["text"].startswith(" Paris")
    assert out["mode"] == "single-process" and out["timings"]["ms_per_token"] > 0


def test_a_batch_over_two_local_peers_matches_generate(expected):
    out = swarm_generate("--local", "2", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1])
    assert [r["token_ids"] for r in out["results"]] == [e[: len(r["token_ids"])] for e, r in zip(expected, out["results"])]
    assert len(out["plan"]) >= 3  # the source keeps the embedding; two peers share the rest
    assert out["plan"][0]["start"] == 0 and out["plan"][-1]["end"] == 32
    assert out["mode"].startswith("swarm (cycle")
    # issue 26: the prediction in the measurement's units, with the fixed per-step costs measured
    p = out["predicted"]
    assert p["ms_per_token"] >= 1e3 * p["latency_s"] - 0.01 and p["time_to_first_token_s"] > 0
    assert p["overhead_ms_per_token"] > 0 and p["compute_ms_per_token"] > 0
