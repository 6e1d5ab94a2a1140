"""The suite's leak checks (tests/conftest.py) name what a test leaves behind, and fail it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def test_threads_processes_and_sockets_left_behind_fail_the_test_and_the_run(tmp_path):
    marker = f"{31 + uuid.uuid4().int % 1000 / 1000:.3f}"  # a sleep only this test starts
    (tmp_path / "test_leaky.py").write_text(textwrap.dedent(f"""
        import socket, subprocess, threading, time

        LEAKED = []

        def test_leaks_a_thread():
            threading.Thread(target=time.sleep, args=(30,), name="leaky-thread", daemon=True).start()

        def test_leaks_a_process():
            subprocess.Popen(["sleep", "{marker}"])

        def test_leaks_a_socket():
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            LEAKED.append(sock)

        def test_cleans_up():
            thread = threading.Thread(target=time.sleep, args=(0.1,))
            thread.start()
            thread.join()
    """))
    try:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-c", str(ROOT / "pyproject.toml"),
             "--rootdir", str(ROOT), "-p", "no:cacheprovider", "-q", str(tmp_path / "test_leaky.py")],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
            env={**os.environ, "SWARM_TEST_LEAK_GRACE_S": "0.5"})
    finally:
        for proc in psutil.process_iter(["cmdline"]):
            if proc.info["cmdline"] == ["sleep", marker]:
                proc.kill()
    out = run.stdout
    assert run.returncode == 1, out
    assert "4 passed, 3 errors" in out, out  # each leaking test errors at teardown
    assert "left behind by this test:\n  thread 'leaky-thread'" in out
    assert "left behind by this test:\n  process" in out and f"sleep {marker}" in out
    assert "left behind by this test:\n  socket" in out and "LISTEN" in out
    run_report = out[out.index("left behind by the run"):]  # and again at the end of the run
    assert "leaky-thread" in run_report and f"sleep {marker}" in run_report and "LISTEN" in run_report
