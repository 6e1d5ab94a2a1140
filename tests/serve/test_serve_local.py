"""`swarm serve --local 2` through the real openai client: the same tokens as
transformers' generate, streamed or not, alone or beside 31 other requests.

One server (and its two peers) for the module, started as a user would start it and
stopped with Ctrl-C at the end, which must stop the peers too.
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import openai
import psutil
import pytest

from swarm.model.stopping import stop_token_ids
from swarm.model import hf
from swarm.serve.app import STATS_INTERVAL_S
from tests.helpers.reference import reference_generate

pytestmark = pytest.mark.slow

KEY = "sk-local"
MAX_LEN = 256
MICRO_BATCHES, BATCH_SIZE = 2, 16  # 32 slots, as `swarm serve` by default
START_TIMEOUT_S = 300.0  # two peers profile the model on a first start
STOP_TIMEOUT_S = 60.0  # the grace for running answers, the peers' unload, their SIGTERM
LOAD_TIMEOUT_S = 60.0
ANSWER_TOKENS = 8
COUNTRIES = ["France", "Italy", "Spain", "Germany", "Japan", "Canada", "Brazil", "Egypt", "India", "Kenya", "Peru",
             "Norway", "Greece", "Chile", "Cuba", "Iran", "Mexico", "Poland", "Sweden", "Turkey", "Vietnam", "Ghana",
             "Nepal", "Austria", "Portugal", "Ireland", "Morocco", "Argentina", "Thailand", "Finland", "Denmark",
             "Belgium"]


@dataclass(frozen=True)
class Served:
    url: str
    process: subprocess.Popen
    model: str
    model_dir: Path
    tokenizer: object
    stop_ids: frozenset[int]


def wait_for_url(proc: subprocess.Popen, timeout_s: float) -> str:
    """The URL the server prints once it serves; everything it printed if it never does.

    Reads the pipe's bytes directly: a buffered readline would hide lines from select."""
    out, deadline = b"", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            data = os.read(proc.stdout.fileno(), 65536)
            if not data:
                break
            out += data
            if match := re.search(rb"(http://\S+)/v1", out):
                return match.group(1).decode()
        elif proc.poll() is not None:
            break
    raise AssertionError("swarm serve did not print its URL:\n" + out.decode(errors="replace"))


@pytest.fixture(scope="module")
def served(smollm2_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "swarm", "serve", "--local", "2", "--port", "0", "--max-len", str(MAX_LEN),
           "--micro-batches", str(MICRO_BATCHES), "--batch-size", str(BATCH_SIZE), "--api-key", KEY,
           "--local-peer-arg=--heartbeat", "--local-peer-arg=0.3"]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = wait_for_url(proc, START_TIMEOUT_S)
        tokenizer = hf.load_tokenizer(smollm2_dir)
        yield Served(url, proc, smollm2_dir.name, smollm2_dir, tokenizer, stop_token_ids(tokenizer))
    finally:
        peers = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            code = proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"Ctrl-C did not stop swarm serve in {STOP_TIMEOUT_S} s; log: {log}")
        finally:
            proc.stdout.close()
        _, alive = psutil.wait_procs(peers, timeout=5)
        assert code == 0 and not alive, f"exit {code}, still running: {alive}; log:\n{log.read_text()[-3000:]}"


def client(served: Served) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@dataclass(frozen=True)
class Expected:
    prompt_tokens: int
    tokens: list[int]
    text: str
    finish_reason: str


def expected(served: Served, prompt: list[int], max_tokens: int) -> Expected:
    """transformers' greedy generate, stopping at the same end-of-turn ids the server stops at."""
    tokens = reference_generate(served.model_dir, [prompt], max_tokens, sorted(served.stop_ids))[0]
    text = served.tokenizer.decode([t for t in tokens if t not in served.stop_ids], skip_special_tokens=True)
    return Expected(len(prompt), tokens, text, "stop" if tokens[-1] in served.stop_ids else "length")


def chat_prompt(served: Served, question: str) -> list[int]:
    return hf.chat_token_ids(served.tokenizer, [{"role": "user", "content": question}])


def question(country: str) -> list[dict]:
    return [{"role": "user", "content": f"What is the capital of {country}?"}]


async def stream_chat(c: openai.AsyncOpenAI, served: Served, messages: list[dict], max_tokens: int, **fields):
    """(text, finish reason, usage) of one streamed chat answer."""
    stream = await c.chat.completions.create(model=served.model, messages=messages, max_tokens=max_tokens,
                                             stream=True, stream_options={"include_usage": True}, **fields)
    pieces, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
            continue
        choice = chunk.choices[0]
        pieces.append(choice.delta.content or "")
        finish = choice.finish_reason or finish
    return "".join(pieces), finish, usage


# ---------------------------------------------------------------- answers equal generate's

async def test_models_lists_the_model(served):
    async with client(served) as c:
        assert [m.id for m in (await c.models.list()).data] == [served.model]


async def test_chat_matches_generate_streamed_or_not(served):
    want = expected(served, chat_prompt(served, "What is the capital of France?"), 24)
    async with client(served) as c:
        reply = await c.chat.completions.create(model=served.model, messages=question("France"), max_tokens=24)
        text, finish, usage = await stream_chat(c, served, question("France"), 24)
    choice = reply.choices[0]
    assert (choice.message.content, choice.finish_reason) == (want.text, want.finish_reason)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (want.prompt_tokens, len(want.tokens))
    assert (text, finish) == (want.text, want.finish_reason)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == \
        (want.prompt_tokens, len(want.tokens), want.prompt_tokens + len(want.tokens))
    assert "Paris" in text


async def test_completions_match_generate_streamed_or_not(served):
    prompt = "The capital of France is"
    want = expected(served, served.tokenizer(prompt)["input_ids"], 12)
    async with client(served) as c:
        reply = await c.completions.create(model=served.model, prompt=prompt, max_tokens=12)
        stream = await c.completions.create(model=served.model, prompt=prompt, max_tokens=12, stream=True)
        chunks = [chunk async for chunk in stream]
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (want.text, want.finish_reason)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (want.prompt_tokens, len(want.tokens))
    assert "".join(ch.choices[0].text for ch in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


async def test_a_stop_string_cuts_the_answer(served):
    want = expected(served, chat_prompt(served, "What is the capital of France?"), 24)
    cut = want.text.index("Paris")
    async with client(served) as c:
        reply = await c.chat.completions.create(model=served.model, messages=question("France"), max_tokens=24,
                                                stop=["Paris"])
        text, finish, _ = await stream_chat(c, served, question("France"), 24, stop=["Paris"])
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (want.text[:cut], "stop")
    assert (text, finish) == (want.text[:cut], "stop")
    assert reply.usage.completion_tokens < len(want.tokens)  # generation stopped there too


async def test_the_swarm_view_shows_the_plan_and_the_load(served):
    async with client(served) as c:
        await c.chat.completions.create(model=served.model, messages=question("Italy"), max_tokens=8)
        body = await c.get("/swarm", cast_to=object)
    assert {p["name"] for p in body["peers"]} >= {"local-1", "local-2"}
    stages = body["plan"]["stages"]
    assert stages[0]["start"] == 0 and stages[-1]["end"] == body["plan"]["num_units"] and len(stages) >= 3
    assert body["plan"]["objective"] == "cycle" and len(body["links"]) == 3
    assert body["requests"]["served"] >= 1 and body["requests"]["generated_tokens"] >= 1


# ---------------------------------------------------------------- slots

async def open_stream(c, served: Served, country: str, max_tokens: int):
    """A streamed answer, read up to its first content: (stream, its first text)."""
    stream = await c.chat.completions.create(model=served.model, messages=question(country), max_tokens=max_tokens,
                                             stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            return stream, chunk.choices[0].delta.content
    raise AssertionError("the stream ended before any text")


async def test_clients_that_disconnect_mid_stream_free_their_slots(served):
    long = MAX_LEN - 64  # a dropped answer that went on would hold its slot for this many tokens
    async with client(served) as c:
        # Every slot taken by a client that reads one piece and hangs up.
        dropped = await asyncio.gather(*(open_stream(c, served, country, long) for country in COUNTRIES))
        for stream, _ in dropped:
            await stream.close()
        # The next 8 all get a slot at once (none waits for a dropped answer to run out).
        async with asyncio.timeout(LOAD_TIMEOUT_S):
            following = await asyncio.gather(*(open_stream(c, served, country, 8) for country in COUNTRIES[:8]))
            for stream, _ in following:
                await stream.close()
        for _ in range(100):
            health = await c.get(served.url + "/health", cast_to=object)
            if health["active"] == 0:
                break
            await asyncio.sleep(0.1)
        assert health["active"] == 0 and health["waiting"] == 0, health
        # And the pipeline is idle: no stage computes for an answer nobody reads.
        await asyncio.sleep(3 * STATS_INTERVAL_S)
        stages = (await c.get("/swarm", cast_to=object))["plan"]["stages"]
    assert [stage["tokens_per_s"] for stage in stages] == [0.0] * len(stages), stages


async def test_32_streaming_clients_at_once_get_exact_answers_in_bounded_memory(served):
    """Greedy answers equal generate's; seeded sampled answers equal the same request alone."""
    prompts = {country: chat_prompt(served, f"What is the capital of {country}?") for country in COUNTRIES}
    wants = {country: expected(served, prompt, ANSWER_TOKENS) for country, prompt in prompts.items()}
    sampled = {"temperature": 0.9, "top_p": 0.95, "seed": 1234}
    server = psutil.Process(served.process.pid)

    def rss() -> int:
        return sum(p.memory_info().rss for p in [server, *server.children(recursive=True)])

    async with client(served) as c:
        alone = await stream_chat(c, served, question("Peru"), ANSWER_TOKENS, **sampled)

        async def one(i: int, country: str):
            fields = sampled if i % 4 == 0 else {}
            return await stream_chat(c, served, question("Peru" if fields else country), ANSWER_TOKENS, **fields)

        memory, took = [], []
        for wave in range(2):
            began = time.monotonic()
            async with asyncio.timeout(LOAD_TIMEOUT_S):
                answers = await asyncio.gather(*(one(i, country) for i, country in enumerate(COUNTRIES)))
            took.append(time.monotonic() - began)
            memory.append(rss())
            for i, (country, (text, finish, usage)) in enumerate(zip(COUNTRIES, answers)):
                if i % 4 == 0:
                    assert (text, finish, usage) == alone, (wave, i)
                else:
                    want = wants[country]
                    assert (text, finish, usage.completion_tokens) == (want.text, want.finish_reason,
                                                                       len(want.tokens)), (wave, country)
    # Every slot was in use in the first wave: a second one adds nothing to speak of.
    assert memory[1] - memory[0] < 64 * 2 ** 20, (memory, took)
    print(f"32 clients: waves took {took[0]:.1f} s and {took[1]:.1f} s; server and peers {memory[1] / 2 ** 20:.0f} MiB")
