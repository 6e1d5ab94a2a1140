"""`swarm` and `python -m swarm` (``swarm.cli.run``): exit codes, error messages and output reach
the caller whole, though the process ends without the interpreter's teardown."""

from __future__ import annotations

import subprocess
import sys


def swarm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swarm", *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_no_command_prints_the_whole_help_and_exits_2():
    done = swarm()
    assert done.returncode == 2
    assert done.stdout.startswith("usage: swarm") and "serve-shard" in done.stdout


def test_an_error_exits_1_with_its_message():
    done = swarm("generate", "--max-new-tokens", "0", "--prompt", "hi")
    assert done.returncode == 1 and done.stderr.strip() == "error: --max-new-tokens must be at least 1"


def test_a_usage_error_exits_2_as_argparse_does():
    done = swarm("plan")
    assert done.returncode == 2 and "swarm plan: error: the following arguments are required: problem" in done.stderr


def test_a_long_output_arrives_whole_through_a_pipe():
    done = swarm("generate", "--help")
    assert done.returncode == 0 and done.stdout.rstrip().endswith("you trust completely"), done.stdout[-300:]
