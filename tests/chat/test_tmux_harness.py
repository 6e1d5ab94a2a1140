"""The tmux harness itself, on a small real terminal program."""

from __future__ import annotations

import sys

import pytest

from tests.helpers.tmux import Terminal

# Reads lines, echoes them upper-cased, starts a child on "spawn"; Ctrl-C is reported, not fatal.
ECHO_PROGRAM = r"""
import subprocess, sys
child = None
while True:
    try:
        line = input("> ")
    except KeyboardInterrupt:
        print("interrupted"); continue
    except EOFError:
        break
    if line == "spawn":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        print("spawned", child.pid)
    else:
        print(line.upper())
if child is not None and "--leak" not in sys.argv:
    child.kill(); child.wait()
print("bye")
"""

pytestmark = pytest.mark.slow


def test_type_wait_and_exit_leave_nothing_behind():
    with Terminal([sys.executable, "-c", ECHO_PROGRAM], width=80, height=20) as term:
        term.wait_for(r"(?m)^>")
        term.type("hello tmux")
        term.press("Enter")
        term.wait_for(r"HELLO TMUX")
        term.type("spawn")
        term.press("Enter")
        term.wait_for(r"spawned \d+")
        assert len(term.leftover_processes()) == 2  # the program and its child, found by tag
        term.press("C-c")
        term.wait_for(r"interrupted")
        term.press("C-d")
        assert term.wait_exit() == 0
        assert "bye" in term.screen()
        term.wait_no_processes()


def test_a_process_left_behind_is_reported_even_when_orphaned():
    with Terminal([sys.executable, "-c", ECHO_PROGRAM, "--leak"], width=80, height=20) as term:
        term.wait_for(r"(?m)^>")
        term.type("spawn")
        term.press("Enter")
        term.wait_for(r"spawned \d+")
        term.press("C-d")
        term.wait_exit()
        with pytest.raises(AssertionError, match="processes left behind"):
            term.wait_no_processes(timeout=0.5)
    assert term.leftover_processes() == []  # close() killed the orphan


def test_wait_for_times_out_with_the_screen_in_the_message():
    with Terminal([sys.executable, "-c", ECHO_PROGRAM], width=80, height=20) as term:
        term.wait_for(r"(?m)^>")
        with pytest.raises(AssertionError, match=r"not on screen within 0.3 s; screen:\n>"):
            term.wait_for(r"never printed", timeout=0.3)
