"""A `swarm serve --no-swarm` process over a tiny random model that speaks SmolLM2's
tokenizer, for tests of the HTTP APIs and the web page: it starts in seconds and
answers any prompt (with random but deterministic text)."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
MAX_LEN = 256  # tokens of context `serving` gives the server


def wait_for_url(proc: subprocess.Popen, timeout_s: float) -> str:
    """The URL the server prints once it serves; everything it printed if it never does.

    Reads the pipe's bytes directly: a buffered readline would hide lines from select."""
    out, deadline = b"", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            data = os.read(proc.stdout.fileno(), 65536)
            if not data:
                break
            out += data
            if match := re.search(rb"(http://\S+)/v1", out):
                return match.group(1).decode()
        elif proc.poll() is not None:
            break
    raise AssertionError("swarm serve did not print its URL:\n" + out.decode(errors="replace"))


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A 2-layer random Llama with SmolLM2's vocabulary, tokenizer and chat template."""
    import torch
    import transformers

    from swarm.model import hf

    out = tmp_path_factory.mktemp("tiny-chat")
    tokenizer = hf.load_tokenizer(smollm2_dir)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, initializer_range=0.2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@dataclass(frozen=True)
class Serving:
    url: str
    model: str
    key: str | None
    process: subprocess.Popen


@contextlib.contextmanager
def serving(model_dir: Path, *args: str, key: str | None = None):
    """`swarm serve` in a process of its own (as a user starts it), stopped with Ctrl-C."""
    cmd = [sys.executable, "-m", "swarm", "serve", "--model", str(model_dir), "--port", "0", "--max-len", str(MAX_LEN),
           "--threads", "1", *args] + (["--api-key", key] if key else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    try:
        yield Serving(wait_for_url(proc, START_TIMEOUT_S), model_dir.name, key, proc)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
