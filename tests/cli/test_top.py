"""`swarm top --local 2`: the live view in a terminal, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.tmux import Terminal

pytestmark = pytest.mark.slow

START_S = 420.0


def test_top_shows_the_local_swarm_and_leaves_on_ctrl_c(smollm2_dir):
    with Terminal([sys.executable, "-m", "swarm", "top", "--local", "2", "--interval", "0.5"],
                  width=110, height=50) as term:
        bar = term.wait_for(r"layers (1+)(2+)(3+)\b", START_S)
        assert len("".join(bar.groups())) == 32
        screen = term.screen()
        assert "local-1" in screen and "local-2" in screen and "(you)" in screen
        assert "local-1 ↔ local-2" in screen or "local-2 ↔ local-1" in screen
        term.press("C-c")
        assert term.wait_exit(60) == 130
        term.wait_no_processes(timeout=20)


def test_top_once_prints_one_view(smollm2_dir):
    done = subprocess.run([sys.executable, "-m", "swarm", "top", "--local", "2", "--once"],
                          capture_output=True, text=True, timeout=START_S)
    assert done.returncode == 0, done.stderr
    assert "32 units in 3 stages" in done.stdout and "local-2" in done.stdout
