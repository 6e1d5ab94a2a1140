"""Every error of `swarm serve` in OpenAI's JSON shape, through the real openai client.

The server runs in this process over a real SwarmSource with the tiny model and no
peers, offering too little memory for any plan: a generation request gets 503 with
the reason, and every check that comes before generation (JSON, fields, key,
model, context) answers as it would over a full swarm.
"""

from __future__ import annotations

import aiohttp
import openai
import pytest

from swarm.model import hf
from swarm.serve.app import ApiServer, ServeConfig
from swarm.source import SourceConfig, SwarmSource

KEY = "sk-test"
MAX_LEN = 64


@pytest.fixture
async def server(tiny_model_dir, smollm2_dir):
    config = SourceConfig(interfaces=["127.0.0.1"], model=tiny_model_dir, mdns=False, mem_bytes=1000,
                          discovery_s=0.0, objective="cycle", micro_batches=2, batch_size=2, max_len=MAX_LEN)
    tokenizer = hf.load_tokenizer(smollm2_dir)  # any chat template: no request here gets to the model
    async with SwarmSource(config) as source:
        async with ApiServer(ServeConfig(model="tiny", max_len=MAX_LEN, port=0, api_key=KEY, stats_interval_s=0.05),
                             source, tokenizer, stop_ids={2}) as api:
            yield api


def client(server, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30)


async def raw(server, method: str, path: str, data: bytes | None = None, key: str | None = KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as http:
        async with http.request(method, server.url + path, data=data, headers=headers) as response:
            return response.status, await response.json()


async def test_no_swarm_is_a_503_with_the_reason(server):
    async with client(server) as c:
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as info:
                await c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4, stream=stream)
            assert info.value.status_code == 503
            error = info.value.body
            assert error["code"] == "swarm_unavailable" and error["type"] == "service_unavailable"
            assert error["message"].startswith("no swarm can be formed: infeasible: the model needs")
            assert "no peers found" in error["message"]
        with pytest.raises(openai.InternalServerError) as info:
            await c.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=4)
        assert info.value.status_code == 503
        assert [m.id for m in (await c.models.list()).data] == ["tiny"]  # the server itself is up
    assert await raw(server, "GET", "/health", key=None) == (200, {"status": "ok", "model": "tiny", "active": 0,
                                                                    "waiting": 0})


async def test_a_wrong_or_missing_key_is_a_401(server):
    async with client(server, key="wrong") as c:
        with pytest.raises(openai.AuthenticationError) as info:
            await c.models.list()
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    status, body = await raw(server, "GET", "/v1/models", key=None)
    assert status == 401 and "missing API key" in body["error"]["message"]


async def test_bad_json_and_bad_fields_are_400s_naming_the_problem(server):
    status, body = await raw(server, "POST", "/v1/chat/completions", b'{"model": "tiny", "messages": [')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    async with client(server) as c:
        for fields, param in (({"temperature": 5}, "temperature"), ({"n": 2}, "n"), ({"top_p": 0}, "top_p"),
                              ({"max_tokens": -1}, "max_tokens"), ({"logprobs": True}, "logprobs")):
            with pytest.raises(openai.BadRequestError) as info:
                await c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], **fields)
            assert info.value.status_code == 400 and info.value.body["param"] == param
        with pytest.raises(openai.BadRequestError) as info:
            await c.chat.completions.create(model="tiny", messages=[{"role": "nobody", "content": "hi"}])
        assert info.value.body["param"] == "messages[0].role"
        with pytest.raises(openai.BadRequestError) as info:
            await c.completions.create(model="tiny", prompt=[10 ** 9])
        assert "vocabulary" in info.value.body["message"]


async def test_a_prompt_and_max_tokens_that_cannot_fit_are_context_length_exceeded(server):
    async with client(server) as c:
        with pytest.raises(openai.BadRequestError) as info:
            await c.completions.create(model="tiny", prompt=[5] * 10, max_tokens=MAX_LEN - 9)
        assert info.value.body["code"] == "context_length_exceeded" and info.value.body["param"] == "max_tokens"
        assert f"maximum context length is {MAX_LEN} tokens" in info.value.body["message"]
        with pytest.raises(openai.BadRequestError) as info:
            await c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * MAX_LEN}])
        assert info.value.body["code"] == "context_length_exceeded" and info.value.body["param"] == "messages"


async def test_an_unknown_model_or_route_is_a_404(server):
    async with client(server) as c:
        with pytest.raises(openai.NotFoundError) as info:
            await c.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
        assert info.value.body["code"] == "model_not_found"
    status, body = await raw(server, "GET", "/v1/nothing")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = await raw(server, "GET", "/v1/chat/completions")
    assert status == 405 and "Method Not Allowed" in body["error"]["message"]


async def test_the_swarm_view_as_json(server):
    status, body = await raw(server, "GET", "/v1/swarm")
    assert status == 200
    assert [p["name"] for p in body["peers"]] == ["source"] and body["plan"] is None
    assert body["requests"] == {"active": 0, "waiting": 0, "served": 0, "generated_tokens": 0}
