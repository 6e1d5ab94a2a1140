"""`swarm join` leaving: Ctrl-C / SIGTERM waits (bounded) until the source moved the
peer's stages away; a second signal, or SIGHUP, leaves at once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from swarm.runtime.client import PeerClient
from tests.helpers.discovery import stop_processes

pytestmark = pytest.mark.slow  # real `swarm join` processes
START_TIMEOUT_S = 120


@pytest.fixture
def joined(tiny_model_dir):
    """A `swarm join` process on loopback (no multicast) and its shard server address."""
    proc = subprocess.Popen([sys.executable, "-m", "swarm", "join", "--model", str(tiny_model_dir), "--name", "leaver",
                             "--interface", "127.0.0.1", "--no-mdns", "--threads", "1", "--leave-timeout", "60"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the `joined` line, printed once it serves
        assert line, proc.stderr.read()
        yield proc, json.loads(line)["address"]
    finally:
        stop_processes([proc])
        proc.stderr.close()


def exited_within(proc: subprocess.Popen, seconds: float) -> bool:
    try:
        proc.wait(seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


async def test_sigterm_keeps_serving_until_the_stage_is_unloaded(joined, tiny_model_dir):
    proc, address = joined
    async with PeerClient(address) as peer:
        await peer.load(tiny_model_dir, 2, 6, slots=1, max_len=8, dep=1)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not (await peer.ping())["leaving"]:
            assert time.monotonic() < deadline, "the peer never said it is leaving"
        assert not exited_within(proc, 0.5)  # still serving the stage a source may be using
        await peer.unload()  # the source moved the stage away
        assert exited_within(proc, 10)
    assert proc.returncode == 0
    said = proc.stderr.read()
    assert "waiting up to 60 s for the source to move this peer's stages away" in said
    assert "stages moved away" in said


@pytest.mark.parametrize("signals", [(signal.SIGTERM, signal.SIGINT), (signal.SIGHUP,)])
async def test_a_second_signal_or_sighup_leaves_at_once(joined, tiny_model_dir, signals):
    proc, address = joined
    async with PeerClient(address) as peer:
        await peer.load(tiny_model_dir, 2, 6, slots=1, max_len=8, dep=1)
        for sig in signals:
            proc.send_signal(sig)
            time.sleep(0.3)
        assert exited_within(proc, 5)
    assert "left the swarm" in proc.stderr.read()
