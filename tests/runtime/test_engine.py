"""The pipeline across local peer processes gives the tokens of the single-process path."""

from __future__ import annotations

import asyncio

import pytest

from swarm.aio import bounded
from swarm.model.sampling import SamplingParams
from swarm.runtime.deploy import StagePlacement as Stage
from swarm.runtime.engine import Pipeline, PipelineConfig
from swarm.runtime.schedule import ContextFull, Layout, Mode
from tests.helpers.pipeline import NEW, PROMPTS, TIMEOUT_S, TINY_UNITS, config, plan_for
from tests.helpers.reference import reference_generate


@pytest.fixture(scope="module")
def transformers_reference(tiny_model_dir):
    return reference_generate(tiny_model_dir, PROMPTS, NEW)


@pytest.mark.parametrize("n_peers", [1, 2, 3, 4])
async def test_sequential_matches_single_process_and_transformers(tiny_model_dir, peers, tiny_reference,
                                                                  transformers_reference, n_peers):
    async with Pipeline(config(tiny_model_dir, plan_for(peers, n_peers))) as pipe:
        assert len(pipe.deployment.ready) == n_peers + 1
        assert all(r.load_s > 0 and r.weight_bytes > 0 and r.rss_bytes > 0 for r in pipe.deployment.ready)
        # One slot: the requests queue and run one after another.
        got = await bounded(pipe.generate_all(PROMPTS[:3], NEW), TIMEOUT_S)
    assert got == tiny_reference(PROMPTS[:3], NEW) == transformers_reference[:3]


@pytest.mark.parametrize("mode", [Mode.NO_BUBBLES, Mode.BUBBLES])
@pytest.mark.parametrize("m, b", [(2, 2), (4, 1)])
@pytest.mark.parametrize("source_end", [2, 1])  # 1: the source's embedding-only stage runs on its event loop
async def test_pipelined_batches_of_different_lengths(tiny_model_dir, peers, tiny_reference, transformers_reference,
                                                      mode, m, b, source_end):
    cuts = [(0, source_end), (source_end, 4), (4, 6)]
    plan = tuple(Stage(addr, start, end) for addr, (start, end) in zip([None, *peers[:2]], cuts))
    # 6 prompts for 4 slots: two requests join when earlier ones leave.
    async with Pipeline(config(tiny_model_dir, plan, m, b, mode)) as pipe:
        got = await bounded(pipe.generate_all(PROMPTS, NEW), TIMEOUT_S)
        stats = await pipe.stage_stats()
    assert got == tiny_reference(PROMPTS, NEW) == transformers_reference
    assert [(s.start, s.end) for s in stats] == cuts
    assert all(0 < s.busy_share <= 1 and s.tokens_per_s > 0 for s in stats)


async def test_requests_of_different_lengths_join_and_leave_between_steps(tiny_model_dir, peers, tiny_reference):
    async with Pipeline(config(tiny_model_dir, plan_for(peers, 2), m=2, b=2)) as pipe:
        async def late(prompt, n):
            return [t async for t in pipe.generate(prompt, n)]

        short = pipe.generate(PROMPTS[1], 3)
        long = pipe.generate(PROMPTS[0], 20)
        first = await anext(long)  # the long request is decoding when two more join
        joined = asyncio.gather(late(PROMPTS[2], 8), late(PROMPTS[3], 5))
        outs = [t async for t in short], [first] + [t async for t in long], *await joined
    want = [tiny_reference([p], n)[0] for p, n in [(PROMPTS[1], 3), (PROMPTS[0], 20), (PROMPTS[2], 8), (PROMPTS[3], 5)]]
    assert list(outs) == want


async def test_multi_turn_session_reuses_the_kv_cache(tiny_model_dir, peers, tiny_reference):
    turn1, turn2 = [5, 6, 7, 8], [50, 51, 52]
    async with Pipeline(config(tiny_model_dir, plan_for(peers, 2), m=1, b=2)) as pipe:
        async with await pipe.open_session() as chat:
            out1 = [t async for t in chat.generate(turn1, 6)]
            after1 = chat.fed_tokens
            out2 = [t async for t in chat.generate(turn2, 7)]
            history = turn1 + out1 + turn2 + out2
            assert chat.history == tuple(history)
            # Turn 2 computed only its new tokens (plus turn 1's last sampled token).
            assert after1 == len(turn1) + 6 - 1
            assert chat.fed_tokens == len(history) - 1
    assert out1 == tiny_reference([turn1], 6)[0]
    assert out2 == tiny_reference([turn1 + out1 + turn2], 7)[0]


async def test_cancel_frees_the_slot_and_others_are_unaffected(tiny_model_dir, peers, tiny_reference):
    async with Pipeline(config(tiny_model_dir, plan_for(peers, 1), m=1, b=1)) as pipe:
        stream = pipe.generate(PROMPTS[0], 50)
        got = [await anext(stream), await anext(stream)]
        await stream.aclose()  # the consumer walks away: the turn is cancelled
        # The only slot comes back, and the next request is exact.
        after = await bounded(pipe.generate_all([PROMPTS[2]], NEW), TIMEOUT_S)
    assert got == tiny_reference([PROMPTS[0]], 2)[0]
    assert after == tiny_reference([PROMPTS[2]], NEW)


async def test_stop_token_ends_the_turn(tiny_model_dir, peers, tiny_reference):
    full = tiny_reference([PROMPTS[0]], NEW)[0]
    stop = full[4]
    async with Pipeline(config(tiny_model_dir, plan_for(peers, 1))) as pipe:
        got = [t async for t in pipe.generate(PROMPTS[0], NEW, stop_ids=[stop])]
    assert got == full[: full.index(stop) + 1]


async def test_seeded_sampling_matches_the_single_process_path(tiny_model_dir, peers):
    from swarm.model.local import LocalChain, generate

    sampling = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=123)
    chain = LocalChain.load(tiny_model_dir, [(0, 3), (3, 6)], max_slots=1, max_len=64)
    want = generate(chain, [PROMPTS[0]], NEW, sampling)
    async with Pipeline(config(tiny_model_dir, plan_for(peers, 2), m=2, b=1)) as pipe:
        got = await bounded(pipe.generate_all([PROMPTS[0]], NEW, sampling), TIMEOUT_S)
    assert got == want


async def test_redeploy_with_a_new_plan_keeps_sessions_exact(tiny_model_dir, peers, tiny_reference):
    turn1, turn2 = [9, 8, 7], [60, 61]
    async with Pipeline(config(tiny_model_dir, plan_for(peers, 1), m=1, b=1)) as pipe:
        chat = await pipe.open_session()
        out1 = [t async for t in chat.generate(turn1, 5)]
        new_plan = (Stage(None, 0, 1), Stage(peers[2], 1, 3), Stage(peers[3], 3, 6))
        await pipe.redeploy(new_plan)
        assert [s.address for s in pipe.deployment.plan] == [None, peers[2], peers[3]]
        out2 = [t async for t in chat.generate(turn2, 5)]
        await chat.aclose()
    assert out1 == tiny_reference([turn1], 5)[0]
    assert out2 == tiny_reference([turn1 + out1 + turn2], 5)[0]


async def test_source_only_plan_runs_without_peers(tiny_model_dir, tiny_reference):
    async with Pipeline(config(tiny_model_dir, (Stage(None, 0, TINY_UNITS),), m=2, b=2)) as pipe:
        got = await bounded(pipe.generate_all(PROMPTS, NEW), TIMEOUT_S)
    assert got == tiny_reference(PROMPTS, NEW)


async def test_a_source_stage_loaded_by_the_caller_is_the_one_that_runs(tiny_model_dir, tiny_reference):
    """`swarm generate` loads its stage on --device and hands it to a source-only pipeline."""
    from swarm.model.shard import Shard

    shard = Shard.load(tiny_model_dir, 0, TINY_UNITS, max_slots=2, max_len=128)
    async with Pipeline(config(tiny_model_dir, (Stage(None, 0, TINY_UNITS),), b=2), first_shard=shard) as pipe:
        assert pipe.deployment.shard is shard
        got = await bounded(pipe.generate_all(PROMPTS[:2], NEW), TIMEOUT_S)
    assert got == tiny_reference(PROMPTS[:2], NEW)


async def test_a_turn_cancelled_while_a_redeploy_forgets_its_step_lets_the_next_turn_start(tiny_model_dir,
                                                                                            tiny_reference):
    """Cancelled with its step out, then that step forgotten (a redeploy or a recovery): the step
    will never land, so the session is idle at once and its next turn starts (it used to stay
    CANCELLING and refuse every turn)."""
    plan = (Stage(None, 0, TINY_UNITS),)
    async with Pipeline(config(tiny_model_dir, plan)) as pipe:
        async with await pipe.open_session() as chat:
            stream = chat.generate(PROMPTS[0], 50)
            first = await anext(stream)  # its next step was launched before this token was handed over
            assert pipe.micro_batches_in_flight == 1
            chat.cancel()
            await pipe.redeploy(plan)
            more = await bounded(_collect(chat.generate([], 3)), TIMEOUT_S)
            await stream.aclose()
    assert [first, *more] == tiny_reference([PROMPTS[0]], 4)[0]


async def _collect(stream) -> list[int]:
    return [t async for t in stream]


def test_bad_plans_are_refused(tiny_model_dir, peers):
    from swarm.runtime.deploy import check_plan

    for plan in [(), (Stage(peers[0], 0, 6),), (Stage(None, 0, 3), Stage(peers[0], 4, 6)),
                 (Stage(None, 0, 3), Stage(peers[0], 3, 5)),
                 (Stage(None, 0, 2), Stage(peers[0], 2, 4), Stage(peers[0], 4, 6))]:
        with pytest.raises(ValueError):
            check_plan(plan, TINY_UNITS)


async def test_a_dead_stage_without_a_replanner_fails_the_turn_at_once(tiny_model_dir, tiny_reference):
    from swarm.runtime.recovery import StageLost
    from swarm.runtime.server import ServerConfig, ShardServer

    async with ShardServer(ServerConfig()) as doomed:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(doomed.serve_forever())
            plan = (Stage(None, 0, 3), Stage(doomed.address, 3, 6))
            cfg = PipelineConfig(tiny_model_dir, plan, layout=Layout(1, 1), max_len=128, step_timeout_s=1.0,
                                 control_timeout_s=1.0)
            async with Pipeline(cfg) as pipe:
                got = []
                with pytest.raises(StageLost, match="not back within"):
                    async for token in pipe.generate(PROMPTS[0], 100):
                        got.append(token)
                        if len(got) == 3:
                            doomed.close()  # the stage stops answering mid-generation
                # The step sent when the third token landed may still come back before the close.
                assert len(got) in (3, 4) and got == tiny_reference([PROMPTS[0]], len(got))[0]
                with pytest.raises(StageLost):  # nothing runs on a pipeline that could not recover
                    await pipe.open_session()


async def test_a_dead_stage_is_replaced_and_the_streams_go_on_exactly(tiny_model_dir, peers, tiny_reference):
    """The replanner moves the lost stage to a live peer; every stream continues, token-identical."""
    from swarm.runtime.recovery import Replanned
    from swarm.runtime.server import ServerConfig, ShardServer

    events, asked = [], []

    async def replan(suspects):
        asked.append(suspects)
        return Replanned((Stage(None, 0, 3), Stage(peers[1], 3, 6)), ("doomed",))

    async with ShardServer(ServerConfig()) as doomed:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(doomed.serve_forever())
            plan = (Stage(None, 0, 3), Stage(doomed.address, 3, 6))
            cfg = PipelineConfig(tiny_model_dir, plan, layout=Layout(2, 1), max_len=128, step_timeout_s=1.0,
                                 control_timeout_s=1.0)
            async with Pipeline(cfg, replan, events.append) as pipe:
                source_shard = pipe.deployment.shard

                async def run(prompt):
                    got = []
                    async for token in pipe.generate(prompt, NEW):
                        got.append(token)
                        if len(got) == 4 and prompt is PROMPTS[0]:
                            doomed.close()  # the stage stops answering mid-generation
                    return got

                outs = await bounded(asyncio.gather(run(PROMPTS[0]), run(PROMPTS[2])), TIMEOUT_S)
                assert [s.address for s in pipe.deployment.plan] == [None, peers[1]]
                assert pipe.deployment.shard is source_shard  # the source kept units [0, 3): not loaded again
    assert list(outs) == tiny_reference([PROMPTS[0], PROMPTS[2]], NEW)
    assert len(events) == 1 and events[0].error is None and events[0].lost == ("doomed",)
    assert events[0].peers == 1 and events[0].sequences == 2
    assert "peer doomed lost; re-planned over 1 peer in" in events[0].describe()


async def test_a_surviving_stage_keeps_its_weights_and_only_its_next_hop_changes(tiny_model_dir, peers,
                                                                                   tiny_reference):
    """The last stage is lost; the re-plan keeps units [1, 3) on the same peer: its LOAD reads
    nothing (the shard stays, pointed at the new last stage) and the streams go on exactly."""
    from swarm.runtime.recovery import Replanned
    from swarm.runtime.server import ServerConfig, ShardServer

    events = []

    async def replan(suspects):
        return Replanned((Stage(None, 0, 1), Stage(peers[1], 1, 3), Stage(peers[2], 3, 6)), ("doomed",))

    async with ShardServer(ServerConfig()) as doomed:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(doomed.serve_forever())
            plan = (Stage(None, 0, 1), Stage(peers[1], 1, 3), Stage(doomed.address, 3, 6))
            cfg = PipelineConfig(tiny_model_dir, plan, layout=Layout(2, 1), max_len=128, step_timeout_s=1.0,
                                 control_timeout_s=1.0)
            async with Pipeline(cfg, replan, events.append) as pipe:
                first = pipe.deployment

                async def run(prompt):
                    got = []
                    async for token in pipe.generate(prompt, NEW):
                        got.append(token)
                        if len(got) == 4 and prompt is PROMPTS[0]:
                            doomed.close()
                    return got

                outs = await bounded(asyncio.gather(run(PROMPTS[0]), run(PROMPTS[2])), TIMEOUT_S)
                assert pipe.deployment is not first
                _, kept, moved = pipe.deployment.ready
                assert kept.kept and kept.load_s == 0.0 and kept.weight_bytes == first.ready[1].weight_bytes
                assert not moved.kept and moved.load_s > 0
    assert list(outs) == tiny_reference([PROMPTS[0], PROMPTS[2]], NEW)
    assert len(events) == 1 and events[0].error is None


@pytest.mark.parametrize("reported", [True, False], ids=["reported-lost", "never-answers"])
async def test_a_stage_lost_while_the_pipeline_loads_is_replanned_at_once(tiny_model_dir, peers, tiny_reference,
                                                                         reported):
    """The first deployment is a phase like any other: a peer gone before it answers its
    LOAD (reported by the owner's directory, or just silent past the control timeout)
    means a re-plan over the live peers, not a failed answer or a LOAD timeout of minutes."""
    from swarm.runtime.recovery import Replanned
    from swarm.runtime.server import ServerConfig, ShardServer

    events, asked = [], []

    async def replan(suspects):
        asked.append(suspects)
        return Replanned((Stage(None, 0, 3), Stage(peers[1], 3, 6)), ("doomed",))

    async with ShardServer(ServerConfig()) as doomed:
        gone = doomed.address  # closed before the pipeline starts: nothing answers there
    plan = (Stage(None, 0, 3), Stage(gone, 3, 6))
    cfg = PipelineConfig(tiny_model_dir, plan, layout=Layout(1, 1), max_len=128,
                         control_timeout_s=30.0 if reported else 1.0)
    pipe = Pipeline(cfg, replan, events.append)
    began = asyncio.get_running_loop().time()
    starting = asyncio.create_task(pipe.__aenter__())
    if reported:
        await asyncio.sleep(0.3)  # while it waits for the lost peer's reply
        pipe.stage_lost([gone], "peer doomed left the swarm")
    await bounded(starting, 10)
    try:
        assert asyncio.get_running_loop().time() - began < 5  # not the 30 s a LOAD's reply would be waited for
        assert [s.address for s in pipe.deployment.plan] == [None, peers[1]]
        assert asked == [frozenset({gone} if reported else ())]
        assert await bounded(pipe.generate_all([PROMPTS[0]], NEW), TIMEOUT_S) == tiny_reference([PROMPTS[0]], NEW)
    finally:
        await pipe.aclose()
    assert len(events) == 1 and events[0].error is None and events[0].lost == ("doomed",) and events[0].peers == 1


async def test_a_request_too_long_for_the_cache_is_refused_and_frees_its_slot(tiny_model_dir, peers, tiny_reference):
    async with Pipeline(config(tiny_model_dir, plan_for(peers, 1), max_len=16)) as pipe:
        with pytest.raises(ContextFull, match="cache positions"):
            await pipe.generate_all([list(range(1, 12))], 8)
        assert await bounded(pipe.generate_all([PROMPTS[0]], 8), TIMEOUT_S) == tiny_reference([PROMPTS[0]], 8)


async def test_closing_a_session_whose_stage_died_does_not_hang(tiny_model_dir):
    from swarm.runtime.server import ServerConfig, ShardServer

    async with ShardServer(ServerConfig()) as doomed:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(doomed.serve_forever())
            plan = (Stage(None, 0, 3), Stage(doomed.address, 3, 6))
            cfg = PipelineConfig(tiny_model_dir, plan, layout=Layout(1, 1), max_len=128, step_timeout_s=0.5,
                                 control_timeout_s=0.5)
            async with Pipeline(cfg) as pipe:
                chat = await pipe.open_session()
                stream = chat.generate(PROMPTS[0], 100)
                await anext(stream)
                doomed.close()  # the next step is lost with the stage
                await stream.aclose()  # cancelled while its step is in flight
                await bounded(chat.aclose(), 5)
                assert pipe.micro_batches_in_flight == 0


async def test_closing_the_pipeline_wakes_a_request_waiting_for_a_slot(tiny_model_dir):
    async with Pipeline(config(tiny_model_dir, plan_for([], 0))) as pipe:  # the source alone, one slot
        holder = await pipe.open_session()
        waiting = asyncio.create_task(pipe.open_session())  # no slot until the holder closes
        await asyncio.sleep(0.05)
        assert not waiting.done()
    async with asyncio.timeout(5):
        with pytest.raises(RuntimeError, match="closed"):
            await waiting
    await holder.aclose()


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=5)],
                         ids=["greedy", "seeded"])
async def test_a_replay_mid_stream_continues_token_for_token(tiny_model_dir, sampling):
    """A loss mid-stream: every sequence's history is replayed as one prefill on the new
    deployment and the streams go on exactly as an undisturbed run (sampled ones too:
    each draw is seeded by the sequence's seed and position)."""
    from swarm.runtime.recovery import Replanned

    plan = (Stage(None, 0, TINY_UNITS),)
    async with Pipeline(config(tiny_model_dir, plan, m=2, b=2)) as pipe:
        want = await bounded(pipe.generate_all(PROMPTS[:4], NEW, sampling), TIMEOUT_S)

    events = []

    async def replan(suspects):
        return Replanned(plan, ("nobody",))

    async with Pipeline(config(tiny_model_dir, plan, m=2, b=2), replan, events.append) as pipe:
        async def run(i: int) -> list[int]:
            own = sampling if sampling.seed is None else SamplingParams(0.9, 20, 0.95, sampling.seed + i)
            got = []
            async for token in pipe.generate(PROMPTS[i], NEW, own):
                got.append(token)
                if i == 0 and len(got) == 5:
                    pipe.stage_lost((), "a test's word")
            return got

        outs = await bounded(asyncio.gather(*(run(i) for i in range(4))), TIMEOUT_S)
    assert list(outs) == want
    assert len(events) == 1 and events[0].error is None and events[0].sequences == 4
