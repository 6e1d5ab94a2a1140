"""OpenAI request validation, response shapes and the answer's text, without a server."""

from __future__ import annotations

import json

import pytest

from swarm.serve import protocol
from swarm.serve.protocol import ApiError, parse_chat_request, parse_completion_request
from swarm.serve.text import SSE_DONE, AnswerText, cut_at_stop, held_back, sse_event

MODEL = "m"


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}


def error_of(parse, body) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(body)
    return info.value


def test_a_chat_request_is_read_field_by_field():
    req = parse_chat_request(chat(max_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop="END", stream=True,
                                  stream_options={"include_usage": True}, user="u", n=1, presence_penalty=0))
    assert req.chat and req.messages == ({"role": "user", "content": "hi"},)
    assert (req.max_tokens, req.stop, req.stream, req.include_usage) == (7, ("END",), True, True)
    assert (req.sampling.temperature, req.sampling.top_p, req.sampling.seed) == (0.5, 0.9, 3)
    # max_completion_tokens is the newer name and wins; unset fields stay None (the server's defaults)
    req = parse_chat_request(chat(max_tokens=7, max_completion_tokens=9))
    assert req.max_tokens == 9 and req.sampling == protocol.Sampling() and not req.stream
    assert parse_chat_request(chat(max_tokens=4, ignore_eos=True)).ignore_eos  # vLLM's extension


def test_message_content_as_text_parts_and_developer_role():
    req = parse_chat_request({"model": MODEL, "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert req.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"})


@pytest.mark.parametrize("body, param", [
    (chat(temperature=3), "temperature"),
    (chat(temperature="hot"), "temperature"),
    (chat(top_p=0), "top_p"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_tokens=True), "max_tokens"),
    (chat(stream="yes"), "stream"),
    (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    (chat(stop=[""]), "stop"),
    (chat(stream_options={"include_usage": True}), "stream_options"),
    (chat(n=2), "n"),
    (chat(ignore_eos=True), "max_tokens"),  # an answer without end needs a length
    (chat(logprobs=True), "logprobs"),
    (chat(tools=[{"type": "function"}]), "tools"),
    (chat(frequency_penalty=0.5), "frequency_penalty"),
    (chat(response_format={"type": "json_object"}), "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
])
def test_every_bad_field_is_a_400_naming_it(body, param):
    err = error_of(parse_chat_request, body)
    assert err.status == 400 and err.param == param and param in err.message
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_a_body_that_is_not_an_object():
    assert error_of(parse_chat_request, [1, 2]).status == 400
    assert error_of(parse_completion_request, "text").status == 400


def test_completion_prompts_text_ids_or_a_batch_of_one():
    assert parse_completion_request({"model": MODEL, "prompt": "abc"}).prompt == "abc"
    assert parse_completion_request({"model": MODEL, "prompt": [5, 6]}).prompt == (5, 6)
    assert parse_completion_request({"model": MODEL, "prompt": ["abc"]}).prompt == "abc"
    assert parse_completion_request({"model": MODEL, "prompt": [[5, 6]]}).prompt == (5, 6)
    for bad in ("", [], ["a", "b"], [1, -1], None, [True]):
        assert error_of(parse_completion_request, {"model": MODEL, "prompt": bad}).param == "prompt"
    assert error_of(parse_completion_request, {"model": MODEL, "prompt": "a", "echo": True}).param == "echo"


def test_context_length_exceeded():
    assert protocol.context_error(10, 20, 30) is None
    err = protocol.context_error(10, 21, 30)
    assert (err.status, err.code, err.param) == (400, "context_length_exceeded", "max_tokens")
    assert "30" in err.message and "31" in err.message
    assert protocol.context_error(30, None, 30).param == "messages"  # no room for even one token


def test_response_shapes():
    body = protocol.chat_completion("id", 1, MODEL, "hello", "stop", 3, 2)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert protocol.text_completion("id", 1, MODEL, "x", "length", 1, 1)["object"] == "text_completion"
    assert protocol.chat_chunk("id", 1, MODEL, {"content": "x"})["choices"][0]["finish_reason"] is None
    assert protocol.usage_chunk("id", 1, MODEL, True, 3, 2)["choices"] == []
    assert protocol.models_list(MODEL, 1)["data"][0]["id"] == MODEL


def test_server_sent_events():
    assert sse_event({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert json.loads(sse_event({"b": 1})[len(b"data: "):]) == {"b": 1}
    assert SSE_DONE == b"data: [DONE]\n\n"


# ---------------------------------------------------------------- the answer's text

VOCAB = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "\xe2", 6: "\x82\xac", 7: "EN", 8: "D", 0: "<eos>"}


def decode(ids: list[int]) -> str:
    """A byte-level decode: an unfinished UTF-8 character shows as U+FFFD, like a real tokenizer's."""
    raw = "".join(VOCAB[i] for i in ids if i != 0).encode("latin-1")
    return raw.decode("utf-8", errors="replace")


def pushed(text: AnswerText, ids: list[int]) -> list[str]:
    return [text.push(i) for i in ids]


def test_text_grows_token_by_token_and_stop_ids_are_not_shown():
    text = AnswerText(decode, stop_ids={0})
    assert pushed(text, [1, 2, 3, 0]) == ["Hel", "lo", " wor", ""]
    assert text.finish() == "" and text.text == "Hello wor"


def test_an_unfinished_character_is_held_until_complete():
    text = AnswerText(decode)
    assert pushed(text, [1, 5, 6]) == ["Hel", "", "€"]


def test_a_stop_string_cuts_the_answer_even_across_tokens():
    text = AnswerText(decode, stop_strings=["END"])
    assert pushed(text, [1, 2, 7]) == ["Hel", "lo", ""]  # "EN" may start "END": held back
    assert text.push(8) == "" and text.stopped and text.text == "Hello"
    assert text.push(1) == ""


def test_a_held_tail_that_was_not_a_stop_is_released_at_the_end():
    text = AnswerText(decode, stop_strings=["END"])
    assert pushed(text, [1, 7]) == ["Hel", ""]
    assert text.finish() == "EN" and text.text == "HelEN"


def test_stop_helpers():
    assert held_back("abcEN", ["END"]) == 2 and held_back("abc", ["END"]) == 0
    assert held_back("xE", ["END", "Ex"]) == 1
    assert cut_at_stop("a END b STOP", ["STOP", "END"]) == 2 and cut_at_stop("abc", ["x"]) is None
