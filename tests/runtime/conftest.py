"""Peer processes shared by the runtime tests: started once per session, one torch thread each."""

from __future__ import annotations

import pytest

from swarm.localswarm import local_peers


@pytest.fixture(scope="session")
def peers() -> list[str]:
    """Addresses of 4 local peer processes (each test deploys its own plan onto them)."""
    with local_peers(4, threads=1, info={"name": "test-peer"}) as addresses:
        yield addresses


@pytest.fixture(scope="session")
def tiny_reference(tiny_model_dir):
    """generate(prompts, n) -> greedy tokens from the single-process shard path."""
    from swarm.model.local import LocalChain, generate

    chain = LocalChain.load(tiny_model_dir, [(0, 6)], max_slots=8, max_len=128)
    return lambda prompts, n: generate(chain, prompts, n)
