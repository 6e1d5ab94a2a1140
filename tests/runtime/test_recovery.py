"""Recovery from a lost stage (swarm.runtime.recovery) over real peer processes: what is kept."""

from __future__ import annotations

import asyncio

from swarm.aio import bounded
from swarm.runtime.client import PeerClient
from swarm.runtime.deploy import StagePlacement as Stage
from swarm.runtime.engine import Pipeline, PipelineConfig
from swarm.runtime.recovery import Replanned
from swarm.runtime.schedule import Layout
from swarm.runtime.server import ServerConfig, ShardServer
from tests.helpers.pipeline import NEW, PROMPTS, TIMEOUT_S


async def _positions_computed(address: str) -> int:
    async with PeerClient(address) as peer:
        return (await peer.ping())["tokens"]


async def test_a_stage_kept_in_place_keeps_its_kv_cache_and_replays_only_what_it_lacks(tiny_model_dir, peers,
                                                                                       tiny_reference):
    """The middle stage is lost; the re-plan moves its units to a fresh peer and keeps the
    source's stage and the last stage in place. The source and the fresh stage replay the
    whole sequence (the fresh one needs every position), the kept last stage computes only
    the position it lacks: over the whole answer it computes each position once, as in an
    uninterrupted run (one more at most, for a step it computed that was then forgotten)."""
    events = []
    kept = peers[2]

    async def replan(suspects):
        return Replanned((Stage(None, 0, 2), Stage(peers[1], 2, 4), Stage(kept, 4, 6)), ("doomed",))

    prompt = PROMPTS[2]
    async with ShardServer(ServerConfig()) as doomed:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(doomed.serve_forever())
            plan = (Stage(None, 0, 2), Stage(doomed.address, 2, 4), Stage(kept, 4, 6))
            cfg = PipelineConfig(tiny_model_dir, plan, layout=Layout(1, 1), max_len=128, step_timeout_s=1.0,
                                 control_timeout_s=1.0)
            async with Pipeline(cfg, replan, events.append) as pipe:
                before = await _positions_computed(kept)
                got = []
                async with await pipe.open_session() as session:
                    async for token in session.generate(prompt, NEW):
                        got.append(token)
                        if len(got) == 4:
                            doomed.close()  # the middle stage stops answering mid-answer
                    after = await bounded(_positions_computed(kept), TIMEOUT_S)
                assert pipe.deployment.kv_kept == (True, False, True)
    assert got == tiny_reference([prompt], NEW)[0]
    assert len(events) == 1 and events[0].error is None
    source, fresh, last = events[0].replayed
    assert source == fresh >= len(prompt) + 4 and last == 1, events[0].replayed
    assert "positions per stage" in events[0].describe()
    uninterrupted = len(prompt) + NEW - 1  # every position but the last token's
    assert uninterrupted <= after - before <= uninterrupted + 1
