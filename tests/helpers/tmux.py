"""Drive a terminal program in a real terminal: a detached tmux session.

Each Terminal runs on its own tmux server (``-L``), so tests never touch a
person's sessions or each other's. Every process started inside carries a unique
environment tag, which is how ``leftover_processes`` finds them even after they
were re-parented to init (a peer orphaned by a crashed chat still counts).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import tempfile
import time
import uuid

import psutil

POLL_S = 0.1
TAG_VARIABLE = "SWARM_TMUX_TEST_TAG"


class Terminal:
    """A program running in a detached tmux pane of a fixed size."""

    def __init__(self, command: list[str], *, width: int = 120, height: int = 50, cwd: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.tag = uuid.uuid4().hex
        self.server = f"swarm-test-{self.tag[:12]}"
        full_env = {**(env or {}), TAG_VARIABLE: self.tag}
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in full_env.items())
        # The shell writes the program's exit status to a file: tmux was seen to leave an
        # exited pane process unreaped (pane never "dead"), so its own status is not relied on.
        self._status_dir = tempfile.TemporaryDirectory(prefix="swarm-tmux-")
        self._status_file = os.path.join(self._status_dir.name, "status")
        shell_line = (f"cd {shlex.quote(cwd or os.getcwd())} && env {exports} {shlex.join(command)}; "
                      f"echo $? > {shlex.quote(self._status_file)}")
        self._tmux("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height), shell_line)
        self._socket = self._tmux("display-message", "-p", "#{socket_path}").strip()
        self._tmux("set-option", "-t", "t", "remain-on-exit", "on")
        self._tmux("set-option", "-t", "t", "history-limit", "10000")

    def _tmux(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-L", self.server, *args], capture_output=True, text=True, timeout=10)
        if done.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def type(self, text: str) -> None:
        """Type text literally (no key names interpreted)."""
        self._tmux("send-keys", "-t", "t", "-l", text)

    def press(self, *keys: str) -> None:
        """Press named keys: "Enter", "C-c", "C-d", "Up", ..."""
        self._tmux("send-keys", "-t", "t", *keys)

    def screen(self, history: bool = True) -> str:
        """The pane's text, wrapped lines joined; with history, everything scrolled off too.

        The empty rows below the last line are dropped, so offsets only grow as the program writes.
        """
        args = ["capture-pane", "-p", "-J", "-t", "t"] + (["-S", "-"] if history else [])
        return self._tmux(*args).rstrip() + "\n"

    def wait_for(self, pattern: str, timeout: float = 30.0, *, after: int = 0) -> re.Match:
        """Poll the screen until the regex ``pattern`` appears at or after character ``after``."""
        deadline = time.monotonic() + timeout
        compiled = re.compile(pattern)
        while True:
            text = self.screen()
            match = compiled.search(text, after)
            if match:
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not on screen within {timeout} s; screen:\n{text}")
            time.sleep(POLL_S)

    def exit_status(self) -> int | None:
        """The program's exit status once it has exited, else None."""
        try:
            with open(self._status_file) as f:
                text = f.read().strip()
        except FileNotFoundError:
            return None
        return int(text) if text else None  # empty: the shell is still writing it

    def wait_exit(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while (status := self.exit_status()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"program still running after {timeout} s; screen:\n{self.screen()}")
            time.sleep(POLL_S)
        return status

    def leftover_processes(self) -> list[psutil.Process]:
        """Every live process started from this terminal (found by its environment tag)."""
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get(TAG_VARIABLE) == self.tag and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def wait_no_processes(self, timeout: float = 15.0) -> None:
        """Fail unless every process started here is gone within ``timeout``."""
        deadline = time.monotonic() + timeout
        while (left := self.leftover_processes()) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if left:
            described = [f"{p.pid} {' '.join(p.cmdline())}" for p in left]
            raise AssertionError("processes left behind:\n" + "\n".join(described))

    def close(self) -> None:
        """Kill the tmux server and anything still tagged; safe to call twice."""
        subprocess.run(["tmux", "-L", self.server, "kill-server"], capture_output=True, timeout=10)
        if self._socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._socket)  # tmux leaves the socket file of a killed server
        self._status_dir.cleanup()
        left = self.leftover_processes()
        for proc in left:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=5)

    def __enter__(self) -> "Terminal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
