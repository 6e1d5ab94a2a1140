"""A deployment (swarm.runtime.deploy) over real loopback peer processes."""

from __future__ import annotations

import asyncio

import pytest
import torch

from swarm.aio import bounded
from swarm.runtime.client import PeerClient
from swarm.runtime.deploy import Deployment, StagePlacement as Stage, check_plan
from swarm.runtime.engine import kept_in_place
from swarm.runtime.wire import Kind

TIMEOUT_S = 60
PROMPT = [3, 4, 5, 6, 7, 8, 9, 10, 11]


async def _status(address: str) -> dict:
    async with PeerClient(address) as peer:
        return await peer.ping()


async def _first_token(dep: Deployment, got: asyncio.Queue, slot: int = 0) -> int:
    await dep.open_slots([slot])
    tokens = torch.tensor([PROMPT])
    done = dep.submit_first_stage(0, 1, [slot], tokens, None, [0])
    out, _ = await done
    if out is None:  # sent on: the last stage's TOKENS come home
        message = await bounded(got.get(), TIMEOUT_S)
        assert message.kind is Kind.TOKENS and message["dep"] == dep.dep_id
        out = message.tensors[0]
    return int(out[0])


async def test_a_deployment_loads_every_stage_and_its_first_token_is_the_single_process_one(
        tiny_model_dir, peers, tiny_reference):
    got: asyncio.Queue = asyncio.Queue()
    plan = (Stage(None, 0, 2), Stage(peers[0], 2, 4), Stage(peers[1], 4, 6))
    async with Deployment(tiny_model_dir, plan, slots=2, max_len=64, on_message=got.put_nowait) as dep:
        assert len(dep.ready) == 3 and all(r.weight_bytes > 0 and not r.kept for r in dep.ready[1:])
        assert dep.kv_kept == (False, False, False)  # nothing to keep from: it replaces no deployment
        assert [(s["start"], s["end"], s["dep"]) for s in await dep.peer_status()] == [(2, 4, dep.dep_id),
                                                                                     (4, 6, dep.dep_id)]
        assert await _first_token(dep, got) == tiny_reference([PROMPT], 1)[0][0]
    for address in peers[:2]:  # exit unloads every peer
        assert (await _status(address))["state"] == "idle"


async def test_release_first_stage_hands_over_the_shard_only_for_the_same_units(tiny_model_dir):
    plan = (Stage(None, 0, 6),)
    async with Deployment(tiny_model_dir, plan, slots=1, max_len=32) as dep:
        shard = dep.shard
        assert await dep.release_first_stage(Stage(None, 0, 6)) is shard and dep.shard is None
    async with Deployment(tiny_model_dir, plan, slots=1, max_len=32) as dep:
        assert await dep.release_first_stage(Stage(None, 0, 3)) is None  # other units: the shard goes


async def test_a_late_unload_of_an_old_deployment_leaves_the_newer_shard_alone(tiny_model_dir, peers):
    """UNLOAD names its deployment: the old one closing after a newer one loaded the same
    peer (a recovery closes the old beside the new) does not drop the new shard."""
    old = await Deployment.load(tiny_model_dir, (Stage(None, 0, 3), Stage(peers[2], 3, 6)), slots=1, max_len=32)
    try:
        async with Deployment(tiny_model_dir, (Stage(None, 0, 2), Stage(peers[2], 2, 6)), slots=1,
                              max_len=32) as new:
            await old.aclose()
            status = await _status(peers[2])
            assert (status["state"], status["dep"], status["start"]) == ("loaded", new.dep_id, 2)
        assert (await _status(peers[2]))["state"] == "idle"
    finally:
        await old.aclose()  # idempotent


async def test_a_peer_kept_in_place_keeps_its_shard_and_its_kv_slots_only_for_its_previous_deployment(
        tiny_model_dir, peers):
    plan = (Stage(None, 0, 3), Stage(peers[3], 3, 6))
    old = await Deployment.load(tiny_model_dir, plan, slots=1, max_len=32)
    try:
        assert kept_in_place(old.plan, plan) == {peers[3]}
        async with Deployment(tiny_model_dir, plan, slots=1, max_len=32, from_dep=old.dep_id) as new:
            await old.aclose(handed_over=kept_in_place(old.plan, plan))
            assert new.ready[1].kept and new.ready[1].load_s == 0.0
            assert new.kv_kept == (False, True)  # the source's own shard was not handed over here
            async with Deployment(tiny_model_dir, plan, slots=1, max_len=32, from_dep=old.dep_id) as newest:
                # Kept again, but it served ``new`` now, not the deployment this one names: slots emptied.
                assert newest.ready[1].kept and newest.kv_kept == (False, False)
    finally:
        await old.aclose()


def test_check_plan_refuses_plans_that_do_not_chain():
    check_plan([Stage(None, 0, 2), Stage("tcp://a:1", 2, 6)], 6)
    for bad in ([], [Stage("tcp://a:1", 0, 6)], [Stage(None, 0, 2), Stage("tcp://a:1", 3, 6)],
                [Stage(None, 0, 2), Stage("tcp://a:1", 2, 4), Stage("tcp://a:1", 4, 6)],
                [Stage(None, 0, 2), Stage("tcp://a:1", 2, 5)]):
        with pytest.raises(ValueError):
            check_plan(bad, 6)
