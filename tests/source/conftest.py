"""The chaos tests' three `swarm join` peers and their undisturbed answers, shared by
test_chaos_phases.py and test_failover.py (starting the peers once, not once per test):
each test has a source of its own, and a peer a test killed or froze is back before the next."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers.chaos import MAX_LEN, PEERS, ChaosPeers, expected_answers


@pytest.fixture(scope="package")
def expected(tiny_model_dir) -> list[list[int]]:
    return expected_answers(tiny_model_dir)


@pytest.fixture(scope="package")
def shared_peers(tiny_model_dir, tmp_path_factory):
    peers = ChaosPeers(tiny_model_dir, tmp_path_factory.mktemp("chaos-logs"), MAX_LEN, shared=True)
    try:
        asyncio.run(_start_all(peers))
        yield peers
    finally:
        peers.stop_all()


async def _start_all(peers: ChaosPeers) -> None:
    await asyncio.gather(*(peers.start(i) for i in range(PEERS)))


@pytest.fixture
async def peers(shared_peers):
    yield shared_peers
    await shared_peers.restart_dead()
