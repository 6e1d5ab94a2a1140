"""`swarm generate` from the command line: the same tokens as transformers, in this process and over a local swarm."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from swarm.model import hf
from swarm.model.stopping import stop_token_ids
from tests.helpers.reference import reference_generate

pytestmark = pytest.mark.slow  # the real default model, and peer processes

# Chat questions the default model answers, and ends with its end-of-turn token, well within
# MAX_NEW tokens: the comparison covers where each answer stops (no stop handling, no pass).
QUESTIONS = ["What is the capital of France?", "What is 2 + 2?"]
MAX_NEW = 24


def swarm_generate(*args: str) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "swarm", "generate", "--json", "--max-new-tokens", str(MAX_NEW),
                           "--chat", *args], capture_output=True, text=True, timeout=300, env=env,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def expected(smollm2_dir) -> list[list[int]]:
    """transformers' greedy answers, each up to and including the first stop token."""
    tokenizer = hf.load_tokenizer(smollm2_dir)
    stop_ids = stop_token_ids(tokenizer, hf.generation_eos_ids(smollm2_dir))
    prompts = [hf.chat_token_ids(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    answers = reference_generate(smollm2_dir, prompts, MAX_NEW, sorted(stop_ids))
    assert all(len(a) < MAX_NEW and a[-1] in stop_ids for a in answers)  # each one stops on its own
    return answers


def test_in_process_answer_is_generates_to_its_end(expected):
    out = swarm_generate("--prompt", QUESTIONS[0])
    assert out["token_ids"] == expected[0]  # the whole answer, its stop token last, nothing after it
    assert out["text"] == "The capital of France is Paris."
    assert out["timings"]["ms_per_token"] > 0


def test_a_batch_over_two_local_peers_matches_generate(expected):
    out = swarm_generate("--local", "2", "--prompt", QUESTIONS[0], "--prompt", QUESTIONS[1])
    assert [r["token_ids"] for r in out["results"]] == expected
    assert len(out["plan"]) >= 3  # the source keeps the embedding; two peers share the rest
    assert out["plan"][0]["start"] == 0 and out["plan"][-1]["end"] == 32
    assert out["mode"].startswith("swarm (cycle")
    # issue 26: the prediction in the measurement's units, with the fixed per-step costs measured
    p = out["predicted"]
    assert p["ms_per_token"] >= 1e3 * p["latency_s"] - 0.01 and p["time_to_first_token_s"] > 0
    assert p["overhead_ms_per_token"] > 0 and p["compute_ms_per_token"] > 0


def test_speculation_gives_the_same_answers_in_process_and_over_two_local_peers(expected):
    """--speculate ngram (issue 23): the answers of decoding without it, token for token; the
    question's words come back in the answer, so lookup drafts and some drafts are accepted."""
    questions = ["--prompt", QUESTIONS[0], "--prompt", QUESTIONS[1]]
    for where in ((), ("--local", "2")):
        out = swarm_generate("--speculate", "ngram", *where, *questions)
        assert [r["token_ids"] for r in out["results"]] == expected, where
        assert out["speculation"]["accepted"] > 0, out["speculation"]
    assert swarm_generate("--speculate", "off", *questions)["speculation"]["drafted"] == 0
