"""Speculative decoding through the pipeline gives exactly the tokens of decoding without it:
in one process and over local peer processes, greedy and seeded, with drafts that are
mostly right (prompt lookup on a looping model) and drafts that are often wrong."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from typing import Sequence

import pytest

from swarm.aio import bounded
from swarm.model.sampling import SamplingParams
from swarm.runtime.deploy import StagePlacement as Stage
from swarm.runtime.engine import Pipeline, PipelineConfig
from swarm.runtime.recovery import Replanned
from swarm.runtime.schedule import Layout
from swarm.runtime.speculate import Speculation
from tests.helpers.pipeline import PROMPTS, TIMEOUT_S, TINY_UNITS, plan_for

NEW = 24
# The last prompt repeats itself: lookup drafts from its very first step, sampled or not.
SPEC_PROMPTS = [*PROMPTS[:3], [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]]
SAMPLINGS = [SamplingParams(), SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=5)]
IDS = ["greedy", "seeded"]
SLOW_DRAFT_S = 0.05  # a draft model step made this slow: it must not stall the event loop


def cfg(model_dir, plan, speculate=Speculation.OFF, m=2, b=2) -> PipelineConfig:
    return PipelineConfig(model_dir, plan, layout=Layout(m, b), max_len=128, speculate=speculate)


class NoisyOracle:
    """A drafter that knows the answers and gets every third draft wrong: verify steps that
    accept some drafts and reject the rest, at positions no lookup would choose."""

    def __init__(self, answers: dict[tuple[int, ...], list[int]], wrong: float = 0.33):
        self.answers, self.wrong = answers, wrong
        self.rng = random.Random(7)

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        for prompt, answer in self.answers.items():
            if tuple(tokens[:len(prompt)]) == prompt:
                done = len(tokens) - len(prompt)
                drafts = answer[done:done + k]
                return [(t + 1) % 256 if self.rng.random() < self.wrong else t for t in drafts]
        return []


async def plain_and_speculated(model_dir, plan, sampling, prompts, drafter=None, speculate=Speculation.NGRAM):
    async with Pipeline(cfg(model_dir, plan)) as pipe:
        want = await bounded(pipe.generate_all(prompts, NEW, sampling), TIMEOUT_S)
    factory = None if drafter is None else (lambda slot: drafter(want))
    async with Pipeline(cfg(model_dir, plan, speculate), drafter=factory) as pipe:
        got = await bounded(pipe.generate_all(prompts, NEW, sampling), TIMEOUT_S)
        stats = pipe.speculation
    return want, got, stats


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=IDS)
async def test_prompt_lookup_in_one_process_gives_the_plain_tokens(tiny_model_dir, sampling):
    plan = (Stage(None, 0, TINY_UNITS),)
    want, got, stats = await plain_and_speculated(tiny_model_dir, plan, sampling, SPEC_PROMPTS)
    assert got == want
    assert stats.verify_steps > 0
    if sampling.greedy:
        assert stats.accepted > 0  # the random model loops: lookup finds it


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=IDS)
async def test_often_wrong_drafts_in_one_process_give_the_plain_tokens(tiny_model_dir, sampling):
    plan = (Stage(None, 0, TINY_UNITS),)

    def oracle(want):
        return NoisyOracle({tuple(p): w for p, w in zip(SPEC_PROMPTS, want)})

    want, got, stats = await plain_and_speculated(tiny_model_dir, plan, sampling, SPEC_PROMPTS, oracle,
                                                  Speculation.MODEL)
    assert got == want
    assert 0 < stats.accepted < stats.drafted  # drafts accepted and drafts rejected


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=IDS)
async def test_over_two_peers_lookup_and_wrong_drafts_give_the_plain_tokens(tiny_model_dir, peers, sampling):
    plan = plan_for(peers, 2)
    want, got, stats = await plain_and_speculated(tiny_model_dir, plan, sampling, SPEC_PROMPTS)
    assert got == want and stats.verify_steps > 0

    def oracle(want):
        return NoisyOracle({tuple(p): w for p, w in zip(SPEC_PROMPTS, want)})

    want, got, stats = await plain_and_speculated(tiny_model_dir, plan, sampling, SPEC_PROMPTS, oracle,
                                                  Speculation.MODEL)
    assert got == want and 0 < stats.accepted < stats.drafted


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=IDS)
async def test_a_replay_mid_verification_replays_the_accepted_history_only(tiny_model_dir, sampling):
    """A stage lost while verify steps are out: the steps are forgotten, each sequence replays
    its accepted tokens (never a draft) on the new deployment, and the answers are the plain ones."""
    plan = (Stage(None, 0, TINY_UNITS),)
    async with Pipeline(cfg(tiny_model_dir, plan)) as pipe:
        want = await bounded(pipe.generate_all(SPEC_PROMPTS, NEW, sampling), TIMEOUT_S)

    events, histories = [], []

    async def replan(suspects):
        return Replanned(plan, ("nobody",))

    async with Pipeline(cfg(tiny_model_dir, plan, Speculation.NGRAM), replan, events.append) as pipe:
        async def run(i: int) -> list[int]:
            own = sampling if sampling.seed is None else SamplingParams(0.9, 20, 0.95, sampling.seed + i)
            session = await pipe.open_session(own)
            got = []
            async with session:
                async for token in session.generate(SPEC_PROMPTS[i], NEW):
                    got.append(token)
                    if not histories and any(s.drafts for s in pipe.sessions):
                        histories.append([(s.history, s.drafts) for s in pipe.sessions if s.drafts])
                        pipe.stage_lost((), "a test's word")
            return got

        outs = await bounded(asyncio.gather(*(run(i) for i in range(4))), TIMEOUT_S)
    assert list(outs) == want
    assert len(events) == 1 and events[0].error is None
    # Verify steps were out when the stage went; what each sequence replays (its history) is a
    # prompt and the plain answer's first tokens: accepted tokens only, never a draft.
    (out,) = histories
    plain = [tuple(p) + tuple(w) for p, w in zip(SPEC_PROMPTS, want)]
    assert out and all(any(full[:len(history)] == history for full in plain) for history, _ in out)


@pytest.fixture(scope="module")
def random_drafter_dir(tmp_path_factory):
    """Another tiny random model (another seed, the same vocabulary): its drafts are mostly wrong."""
    from swarm.model import hf

    return hf.save_tiny_llama(tmp_path_factory.mktemp("tiny-draft"), seed=1)


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=IDS)
async def test_a_random_draft_model_gives_the_plain_tokens(tiny_model_dir, random_drafter_dir, sampling):
    from swarm.model.draft import load_drafter

    plan = (Stage(None, 0, TINY_UNITS),)
    drafter = load_drafter(random_drafter_dir, tiny_model_dir, slots=4, max_len=128)
    async with Pipeline(cfg(tiny_model_dir, plan)) as pipe:
        want = await bounded(pipe.generate_all(SPEC_PROMPTS, NEW, sampling), TIMEOUT_S)
    async with Pipeline(cfg(tiny_model_dir, plan, Speculation.MODEL), drafter=drafter) as pipe:
        got = await bounded(pipe.generate_all(SPEC_PROMPTS, NEW, sampling), TIMEOUT_S)
        stats = pipe.speculation
    assert got == want
    assert stats.drafted > stats.accepted  # rejections: the drafter is another random model


async def test_the_model_drafting_for_itself_is_always_right(tiny_model_dir):
    """The target as its own draft model: greedy drafts are the verifier's draws, all accepted,
    and the drafter's own cache follows the history across verify steps."""
    from swarm.model.draft import load_drafter

    plan = (Stage(None, 0, TINY_UNITS),)
    async with Pipeline(cfg(tiny_model_dir, plan)) as pipe:
        want = await bounded(pipe.generate_all(SPEC_PROMPTS, NEW), TIMEOUT_S)
    drafter = load_drafter(tiny_model_dir, tiny_model_dir, slots=4, max_len=128)
    async with Pipeline(cfg(tiny_model_dir, plan, Speculation.MODEL), drafter=drafter) as pipe:
        got = await bounded(pipe.generate_all(SPEC_PROMPTS, NEW), TIMEOUT_S)
        stats = pipe.speculation
    assert got == want
    assert stats.drafted > 0 and stats.accepted == stats.drafted


async def test_a_slow_draft_model_computes_off_the_event_loop(tiny_model_dir):
    """The draft model's proposals run on its own thread (one owner of its KV slots): while a
    slow one computes, the event loop goes on (a ticker advances during its steps; with the
    proposals on the loop it never could), and the tokens are the plain ones."""
    from swarm.model.draft import DraftModel

    plan, prompts = (Stage(None, 0, TINY_UNITS),), SPEC_PROMPTS[2:]
    async with Pipeline(cfg(tiny_model_dir, plan)) as pipe:
        want = await bounded(pipe.generate_all(prompts, NEW), TIMEOUT_S)
    model = DraftModel.load(tiny_model_dir, slots=4, max_len=128)  # drafting for itself: always right
    ticks, during, threads = [0], [], set()
    step = model.chain.step

    def slow_step(*args, **kwargs):
        before = ticks[0]
        time.sleep(SLOW_DRAFT_S)
        during.append(ticks[0] - before)
        threads.add(threading.current_thread())
        return step(*args, **kwargs)

    model.chain.step = slow_step

    async def tick() -> None:
        while True:
            await asyncio.sleep(SLOW_DRAFT_S / 20)
            ticks[0] += 1

    async with Pipeline(cfg(tiny_model_dir, plan, Speculation.MODEL), drafter=model) as pipe:
        async with asyncio.TaskGroup() as tasks:
            ticker = tasks.create_task(tick())
            try:
                got = await bounded(pipe.generate_all(prompts, NEW), TIMEOUT_S)
            finally:
                ticker.cancel()
        stats = pipe.speculation
    assert got == want and stats.accepted == stats.drafted > 0
    assert threading.main_thread() not in threads and len(threads) == 1
    # The loop ticked while the draft model slept (a loaded machine may starve a few ticks).
    assert sum(1 for n in during if n > 0) > len(during) / 2, during


def test_a_draft_model_of_another_vocabulary_is_refused(tiny_model_dir, smollm2_dir):
    from swarm.model.draft import load_drafter

    with pytest.raises(ValueError, match="same tokenizer"):
        load_drafter(tiny_model_dir, smollm2_dir, slots=1, max_len=16)


async def test_a_full_slot_beside_a_drafting_row_keeps_the_step_inside_the_cache(tiny_model_dir):
    """Two rows of one micro-batch: the long one ends at its slot's last position while the
    short one verifies 8 drafts a step; the step's width (its padding) is kept within the
    long row's slot."""
    plan = (Stage(None, 0, TINY_UNITS),)
    long, short = list(range(3, 60)), [5, 6, 7, 8, 9]
    max_len = len(long) + 4 - 1  # exactly what the long one needs for 4 tokens (check_turn_fits)
    sizes = [4, max_len - len(short)]

    async def both(speculate, drafter=None):
        config = PipelineConfig(tiny_model_dir, plan, layout=Layout(1, 2), max_len=max_len, speculate=speculate)
        async with Pipeline(config, drafter=drafter) as pipe:
            async def run(prompt, n):
                return [t async for t in pipe.generate(prompt, n)]

            out = await bounded(asyncio.gather(run(long, sizes[0]), run(short, sizes[1])), TIMEOUT_S)
            return list(out), pipe.speculation

    want, _ = await both(Speculation.OFF)
    oracle = NoisyOracle({(*short,): want[1]}, wrong=0.0)  # always right: k grows to 8 and stays
    got, stats = await both(Speculation.MODEL, lambda slot: oracle)
    assert got == want and stats.accepted == stats.drafted > 0


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=IDS)
async def test_turns_that_end_inside_accepted_drafts_continue_exactly(tiny_model_dir, sampling):
    """A chat's turns: one ends on a stop token that arrives among accepted drafts (the rest
    are dropped), the next feeds its new tokens after exactly the kept positions."""
    plan = (Stage(None, 0, TINY_UNITS),)
    turns = [([5, 6, 7, 8, 9], 6, {14}), ([5, 6, 7, 8, 9, 22, 22], 10, set()), ([7, 8, 9], 12, {181})]

    async def chat(speculate):
        async with Pipeline(cfg(tiny_model_dir, plan, speculate)) as pipe:
            async with await pipe.open_session(sampling) as session:
                out = [[t async for t in session.generate(new, n, stop)] for new, n, stop in turns]
                return out, session.history, pipe.speculation

    want, history, _ = await bounded(chat(Speculation.OFF), TIMEOUT_S)
    got, spec_history, stats = await bounded(chat(Speculation.NGRAM), TIMEOUT_S)
    assert got == want and spec_history == history
    assert stats.verify_steps > 0
    if sampling.greedy:
        assert want[0][-1] == 14 and len(want[0]) == 5  # 22, 22, 22, 22, 14: the stop token ends the turn
