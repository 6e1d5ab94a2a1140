"""Ollama's API of `swarm serve` through the real ollama client: the same text and
token counts as the OpenAI endpoint gives for the same greedy request, streamed
(NDJSON) or not; models, show, version; and the API key guarding it all."""

from __future__ import annotations

import httpx
import ollama
import openai
import pytest

from tests.serve.conftest import serving

KEY = "sk-ollama"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TOKENS = 12
GREEDY = {"temperature": 0.0, "num_predict": TOKENS}


@pytest.fixture(scope="module")
def served(tiny_chat_model_dir):
    with serving(tiny_chat_model_dir, "--no-swarm", key=KEY) as s:
        yield s


@pytest.fixture
def client(served):
    with ollama.Client(served.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture
def oai(served):
    with openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


def openai_chat(oai, served, messages) -> tuple[str, int, int]:
    reply = oai.chat.completions.create(model=served.model, messages=messages, max_tokens=TOKENS, temperature=0)
    return reply.choices[0].message.content, reply.usage.prompt_tokens, reply.usage.completion_tokens


def test_chat_is_the_openai_answer(client, oai, served):
    text, prompt_tokens, tokens = openai_chat(oai, served, QUESTION)
    reply = client.chat(model=served.model, messages=QUESTION, options=GREEDY)
    assert reply.message.role == "assistant" and reply.message.content == text and text
    assert (reply.done, reply.done_reason) == (True, "length")
    assert (reply.prompt_eval_count, reply.eval_count) == (prompt_tokens, tokens)
    assert reply.total_duration >= reply.eval_duration > 0 and reply.prompt_eval_duration > 0
    assert reply.load_duration >= 0 and reply.created_at.endswith("Z")


def test_chat_streams_ndjson_by_default(client, oai, served):
    text, prompt_tokens, tokens = openai_chat(oai, served, QUESTION)
    parts = list(client.chat(model=served.model, messages=QUESTION, options=GREEDY, stream=True))
    assert len(parts) > 2 and not any(p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == text
    assert (parts[-1].done_reason, parts[-1].prompt_eval_count, parts[-1].eval_count) == \
        ("length", prompt_tokens, tokens)
    # A raw request without "stream" streams too, one JSON object a line.
    with httpx.stream("POST", served.url + "/api/chat", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      json={"model": served.model, "messages": QUESTION, "options": GREEDY}) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [line for line in response.iter_lines() if line]
    assert len(lines) == len(parts)


def test_generate_is_the_chat_answer_or_the_raw_completion(client, oai, served):
    text, _, tokens = openai_chat(oai, served, QUESTION)
    reply = client.generate(model=served.model, prompt=QUESTION[0]["content"], options=GREEDY)
    assert (reply.response, reply.eval_count, reply.done) == (text, tokens, True)
    parts = list(client.generate(model=served.model, prompt=QUESTION[0]["content"], options=GREEDY, stream=True))
    assert "".join(p.response for p in parts) == text and parts[-1].done

    completion = oai.completions.create(model=served.model, prompt="The capital of France is", max_tokens=TOKENS,
                                        temperature=0)
    raw = client.generate(model=served.model, prompt="The capital of France is", raw=True, options=GREEDY)
    assert raw.response == completion.choices[0].text and raw.eval_count == completion.usage.completion_tokens


def test_stop_strings_and_system_prompts(client, oai, served):
    system = [{"role": "system", "content": "Answer in one word."}]
    text, _, _ = openai_chat(oai, served, system + QUESTION)
    reply = client.generate(model=served.model, system=system[0]["content"], prompt=QUESTION[0]["content"],
                            options=GREEDY)
    assert reply.response == text
    stop = text[len(text) // 2:][:3]
    cut = client.chat(model=served.model, messages=system + QUESTION, options={**GREEDY, "stop": [stop]})
    assert cut.message.content == text[:text.index(stop)] and cut.done_reason == "stop"


def test_list_show_version_and_load(client, served):
    models = client.list().models
    assert [m.model for m in models] == [served.model]
    assert models[0].details.family == "llama" and models[0].size > 0 and models[0].digest
    shown = client.show(served.model + ":latest")
    assert shown.modelinfo["general.architecture"] == "llama" and shown.modelinfo["llama.context_length"] == 256
    assert "im_start" in shown.template and shown.capabilities == ["completion"]
    assert shown.details.parameter_size == models[0].details.parameter_size
    version = httpx.get(served.url + "/api/version", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert version["version"].count(".") == 2
    loaded = client.generate(model=served.model)  # no prompt: Ollama's "load the model"
    assert (loaded.done, loaded.done_reason, loaded.response) == (True, "load", "")
    assert [m.model for m in client.ps().models] == [served.model]


def test_errors_are_ollama_errors(client, served):
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="llama3", messages=QUESTION)
    assert info.value.status_code == 404 and "model 'llama3' not found" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model=served.model, messages=QUESTION, options={"repeat_penalty": 1.3})
    assert info.value.status_code == 400 and "repeat_penalty" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model=served.model, messages=QUESTION, format="json")
    assert info.value.status_code == 400 and "'format' is not supported" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        list(client.chat(model=served.model, messages=QUESTION, options={"num_predict": 1000}, stream=True))
    assert info.value.status_code == 400 and "maximum context length is 256" in info.value.error


@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_the_api_key_guards_every_route(served, key):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with ollama.Client(served.url, headers=headers, timeout=30) as c:
        for call in (c.list, lambda: c.show(served.model), lambda: c.chat(model=served.model, messages=QUESTION),
                     lambda: c.generate(model=served.model, prompt="hi")):
            with pytest.raises(ollama.ResponseError) as info:
                call()
            assert info.value.status_code == 401 and "API key" in info.value.error
    for path in ("/api/version", "/api/swarm/events", "/v1/models"):
        assert httpx.get(served.url + path, headers=headers).status_code == 401
    assert httpx.get(served.url + "/health").status_code == 200


def test_no_swarm_is_a_source_only_pipeline(served):
    """`serve --no-swarm` runs the pipeline chat and generate run without a swarm: no source,
    no discovery, no plan (a SwarmSource would have planned the model onto itself)."""
    body = httpx.get(served.url + "/v1/swarm", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [p["name"] for p in body["peers"]] == ["source"] and body["plan"] is None
    assert body["diagnostic"] == "--no-swarm: this process alone, no discovery"
