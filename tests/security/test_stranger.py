"""Strangers on 127.0.0.1: two `swarm join` peers with secret A, one with secret B.

`swarm peers` with A lists exactly the two; a DEALER without CURVE, one with another
swarm's keys and one with its own client key sending PING, INFO, LOAD, OPEN and STEP
to every socket of the members get no reply and reach no handler, while a generation
over swarm A returns transformers' tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import subprocess
import sys

import pytest

from swarm.runtime import sockets
from swarm.runtime.client import PeerClient
from swarm.runtime.engine import Pipeline
from swarm.localswarm import local_peers
from swarm.runtime.server import ServerConfig, ShardServer
from swarm.secret import ENV_VARIABLE, SwarmSecret
from tests.helpers.discovery import fixture_profile, stop_processes
from tests.helpers.reference import reference_generate
from tests.helpers.pipeline import PROMPTS, config, plan_for

from tests.helpers.strangers import replies_to_strangers

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 60
NEW = 8


def join(folder, name: str, secret: str) -> subprocess.Popen:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(fixture_profile(name=name)))
    return subprocess.Popen(
        [sys.executable, "-m", "swarm", "join", "--interface", "127.0.0.1", "--name", name, "--profile", str(path),
         "--heartbeat", "0.3", "--probe-interval", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, ENV_VARIABLE: secret, "OMP_NUM_THREADS": "1"})


def joined(proc: subprocess.Popen) -> dict:
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_S)
    assert ready, "swarm join did not start"
    return json.loads(proc.stdout.readline())


def swarm_peers(secret: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swarm", "peers", "--interface", "127.0.0.1", "--json", "--wait", "4"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, ENV_VARIABLE: secret})


@pytest.fixture(scope="module")
def swarms(tmp_path_factory):
    """{name: joined line}: member-1 and member-2 in this run's swarm (A), stranger-b in swarm B."""
    folder = tmp_path_factory.mktemp("swarms")
    secret_a, secret_b = os.environ[ENV_VARIABLE], SwarmSecret.new().join_code
    procs = {name: join(folder, name, s) for name, s in
             (("member-1", secret_a), ("member-2", secret_a), ("stranger-b", secret_b))}
    try:
        yield {name: joined(proc) for name, proc in procs.items()}
    finally:
        stop_processes(list(procs.values()))


def test_swarm_peers_lists_exactly_the_members(swarms):
    listed = swarm_peers(os.environ[ENV_VARIABLE])
    assert listed.returncode == 0, listed.stderr
    assert {p["id"] for p in json.loads(listed.stdout)["peers"]} == {swarms["member-1"]["joined"],
                                                                      swarms["member-2"]["joined"]}
    # From a third swarm, every one of them is a record from another swarm, and the diagnostic says so.
    outsider = swarm_peers(SwarmSecret.new().join_code)
    assert outsider.returncode == 1 and json.loads(outsider.stdout)["peers"] == []
    foreign = re.search(r"heard \d+ records? from another swarm \(([^)]*)\)", outsider.stderr)
    assert foreign, outsider.stderr
    for name in swarms:
        assert f"{name}-" in foreign.group(1)


async def test_strangers_get_no_reply_and_reach_no_handler_while_members_generate(swarms, tiny_model_dir):
    keys = sockets.current_keys()
    want = reference_generate(tiny_model_dir, PROMPTS, NEW)
    refused_before = sockets.HANDSHAKES.refused
    with local_peers(2, threads=1) as peers:
        async with ShardServer(ServerConfig()) as counted:  # a member nothing else talks to: it counts exactly
            async with asyncio.TaskGroup() as tg:
                tg.create_task(counted.serve_forever())
                async with PeerClient(peers[0]) as peer:
                    pipeline_data = sockets.data_address(peers[0], (await peer.ping())["data_port"])
                member = swarms["member-1"]
                targets = [counted.address, sockets.data_address(counted.address, counted.data_port),
                           member["address"], sockets.data_address(member["address"], member["data_port"]),
                           peers[0], pipeline_data]
                async with Pipeline(config(tiny_model_dir, plan_for(peers, 2), m=2, b=1)) as pipe:
                    generation = tg.create_task(pipe.generate_all(PROMPTS, NEW))
                    replies = await asyncio.to_thread(replies_to_strangers, targets, keys)
                    got = await generation
                status = counted.status()
                counted.close()
    assert replies == {name: 0 for name in replies}
    assert status["received"] == 0 and status["errors"] == 0  # no handler saw a stranger's frame
    # The members' server key alone does not get anyone in: the ZAP handler refused those clients.
    assert sockets.HANDSHAKES.refused > refused_before
    assert got == want
