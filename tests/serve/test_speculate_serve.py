"""Speculation per request in `swarm serve`: the OpenAI field ``speculate`` (the openai client
sends it with ``extra_body``) and Ollama's ``options.speculate``, "off" or "ngram", over the
server's ``--speculate``. The same text and token counts with and without (greedy and seeded);
the request's drafts in ``usage.speculation`` (OpenAI) or ``speculation`` (Ollama's last
object) exactly when it speculated."""

from __future__ import annotations

import json

import httpx
import ollama
import openai
import pytest

from tests.serve.conftest import serving

# A text that repeats itself: prompt lookup drafts from the first step on (the random model
# mostly rejects the drafts; the answer must not change either way).
REPEATING = "one two three four five one two three four five one two three four five one two three"
TOKENS = 16
SEEDED = {"temperature": 0.9, "top_p": 0.95, "seed": 5}


@pytest.fixture(scope="module")
def served_off(tiny_chat_model_dir):
    with serving(tiny_chat_model_dir, "--no-swarm", "--speculate", "off") as s:
        yield s


@pytest.fixture(scope="module")
def served_default(tiny_chat_model_dir):
    with serving(tiny_chat_model_dir, "--no-swarm") as s:  # prompt lookup by default
        yield s


def oai(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=60)


def completion(served, **fields) -> tuple[str, int, dict | None]:
    """(text, completion tokens, usage.speculation or None) of one /v1/completions request."""
    with oai(served) as c:
        reply = c.completions.create(model=served.model, prompt=REPEATING, max_tokens=TOKENS, **fields)
    extra = reply.usage.model_extra or {}
    return reply.choices[0].text, reply.usage.completion_tokens, extra.get("speculation")


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, SEEDED], ids=["greedy", "seeded"])
def test_openai_field_speculates_one_request_with_the_same_answer(served_off, sampling):
    plain, plain_tokens, none = completion(served_off, **sampling)
    text, tokens, drafts = completion(served_off, **sampling, extra_body={"speculate": "ngram"})
    assert (text, tokens) == (plain, plain_tokens) and tokens == TOKENS and text
    assert none is None  # the server's --speculate off: nothing drafted, nothing reported
    assert drafts["drafted"] > 0 and drafts["verify_steps"] > 0 and 0 <= drafts["accepted"] <= drafts["drafted"]
    off = completion(served_off, **sampling, extra_body={"speculate": "off"})
    assert off == (plain, plain_tokens, None)


def test_openai_stream_reports_the_drafts_in_its_usage_chunk(served_off):
    plain, _, _ = completion(served_off, temperature=0.0)
    with oai(served_off) as c:
        stream = c.completions.create(model=served_off.model, prompt=REPEATING, max_tokens=TOKENS, temperature=0.0,
                                      stream=True, stream_options={"include_usage": True},
                                      extra_body={"speculate": "ngram"})
        chunks = list(stream)
        unasked = c.completions.create(model=served_off.model, prompt=REPEATING, max_tokens=TOKENS, temperature=0.0,
                                       stream=True, stream_options={"include_usage": True})
        last = list(unasked)[-1]
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == plain
    assert chunks[-1].usage.completion_tokens == TOKENS and chunks[-1].usage.model_extra["speculation"]["drafted"] > 0
    assert last.usage.completion_tokens == TOKENS and "speculation" not in (last.usage.model_extra or {})


def test_the_server_default_is_prompt_lookup_and_a_request_may_turn_it_off(served_default, served_off):
    plain = completion(served_off, temperature=0.0)
    text, tokens, drafts = completion(served_default, temperature=0.0)
    assert (text, tokens) == plain[:2] and drafts["drafted"] > 0
    assert completion(served_default, temperature=0.0, extra_body={"speculate": "off"}) == (*plain[:2], None)


def test_a_bad_speculate_value_is_refused_naming_the_field(served_off):
    with pytest.raises(openai.BadRequestError, match="speculate"):
        completion(served_off, extra_body={"speculate": "model"})
    with ollama.Client(served_off.url, timeout=60) as client, pytest.raises(ollama.ResponseError, match="speculate"):
        client.chat(model=served_off.model, messages=[{"role": "user", "content": "hi"}],
                    options={"speculate": "yes"})


def ollama_final(served, options: dict) -> dict:
    """The last NDJSON object of a raw /api/generate (the ollama client drops fields it does not know)."""
    body = {"model": served.model, "prompt": REPEATING, "raw": True, "options": options}
    with httpx.stream("POST", served.url + "/api/generate", json=body, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    return json.loads(lines[-1])


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, SEEDED], ids=["greedy", "seeded"])
def test_ollama_option_speculates_one_request_with_the_same_answer(served_off, sampling):
    options = {**sampling, "num_predict": TOKENS}
    with ollama.Client(served_off.url, timeout=60) as client:
        plain = client.generate(model=served_off.model, prompt=REPEATING, raw=True, options=options)
        spec = client.generate(model=served_off.model, prompt=REPEATING, raw=True,
                               options={**options, "speculate": "ngram"})
    assert (spec.response, spec.eval_count) == (plain.response, plain.eval_count) == (plain.response, TOKENS)
    assert plain.response == completion(served_off, **sampling)[0]  # the OpenAI route's answer, too
    assert "speculation" not in ollama_final(served_off, options)
    drafts = ollama_final(served_off, {**options, "speculate": "ngram"})["speculation"]
    assert drafts["drafted"] > 0 and drafts["verify_steps"] > 0
