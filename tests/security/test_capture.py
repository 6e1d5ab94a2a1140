"""What travels on the wire: tcpdump on lo while a generation runs over two peers.

The hidden states the source sends the first peer (recorded from the source's own
shard as it computes them) must appear nowhere in the capture; with --insecure they do,
which shows the search would find them.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess

import pytest
import torch

from swarm import secret
from swarm.model.shard import Shard
from swarm.runtime import sockets
from swarm.runtime.client import PeerClient
from swarm.runtime.engine import Pipeline
from swarm.localswarm import local_peers
from tests.helpers.pipeline import config, plan_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.needs(None if shutil.which("tcpdump") else "tcpdump is not installed (apt-get install tcpdump)"),
    pytest.mark.needs(None if os.geteuid() == 0 else "capturing on lo needs root"),
]

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]
NEW = 6
WINDOW = 32  # bytes of the hidden state looked for at a time (8 float32 values)
TCPDUMP_START_S = 10.0


def record_source_outputs(monkeypatch) -> list[bytes]:
    """Every hidden state the source's own shard (units from 0) computes, as the bytes it sends."""
    sent: list[bytes] = []
    step = Shard.step

    def recording(shard, slots, inputs, lengths=None, keep=None, draws=None):
        out = step(shard, slots, inputs, lengths, keep, draws)
        if shard.start == 0 and not shard.is_last:
            sent.append(out.contiguous().numpy().tobytes())
        return out

    monkeypatch.setattr(Shard, "step", recording)
    return sent


@contextlib.contextmanager
def capture(path, ports: list[int]):
    expression = " or ".join(f"port {p}" for p in ports)
    proc = subprocess.Popen(["tcpdump", "-i", "lo", "-s", "0", "-U", "--immediate-mode", "-n", "-w", str(path), f"tcp and ({expression})"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stderr], [], [], TCPDUMP_START_S)
        assert ready and "listening on" in proc.stderr.readline(), "tcpdump did not start"
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # flushes the file
        proc.wait(10)
        proc.stderr.close()


async def generate_and_capture(tmp_path, model_dir, insecure: bool) -> tuple[bytes, list[list[int]]]:
    with local_peers(2, threads=1, args=["--insecure"] if insecure else []) as peers:
        ports = []
        for address in peers:
            async with PeerClient(address) as peer:
                ports += [sockets.port_of(address), (await peer.ping())["data_port"]]
        plan = plan_for(peers, 2)
        path = tmp_path / f"{'insecure' if insecure else 'curve'}.pcap"
        with capture(path, ports):
            async with Pipeline(config(model_dir, plan)) as pipe:
                got = await pipe.generate_all([PROMPT], NEW)
    return path.read_bytes(), got


def windows(data: bytes) -> list[bytes]:
    return [data[i:i + WINDOW] for i in range(0, len(data) - WINDOW + 1, WINDOW)]


async def test_hidden_states_never_cross_the_wire_in_the_clear(tmp_path, tiny_model_dir, monkeypatch):
    sent = record_source_outputs(monkeypatch)
    encrypted, got = await generate_and_capture(tmp_path, tiny_model_dir, insecure=False)
    assert len(sent) == NEW  # a prefill, then one step per further token
    hidden = windows(sent[0])  # the prefill: float32 [1, len(PROMPT), hidden]
    with secret.using(secret.INSECURE):
        plain, got_plain = await generate_and_capture(tmp_path, tiny_model_dir, insecure=True)
    assert sent[NEW] == sent[0]  # the same hidden state went out in both runs
    assert got == got_plain
    assert len(encrypted) > 10_000  # the generation's traffic was captured
    assert sum(w in plain for w in hidden) == len(hidden), "the search finds the hidden state in plain TCP"
    assert [w for w in hidden if w in encrypted] == []
