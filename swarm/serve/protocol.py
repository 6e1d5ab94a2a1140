"""OpenAI's request and response shapes, as pure functions (no I/O, no torch).

Requests are validated field by field into frozen dataclasses; anything wrong
raises ``ApiError`` naming the field, which the app turns into OpenAI's error JSON
(``{"error": {"message", "type", "param", "code"}}``). Fields of the API that swarm
does not implement are refused when they ask for something (``n`` > 1, logprobs,
tools, penalties) rather than silently ignored; fields that ask for nothing
(``user``, ``store``, ``n`` = 1, zero penalties) are accepted.

Responses are built here too, so their shape is tested without a server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

MAX_STOP_STRINGS = 4  # as OpenAI
ROLES = ("system", "developer", "user", "assistant")


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_field(param: str, message: str) -> ApiError:
    return ApiError(400, f"'{param}': {message}", param=param, code="invalid_value")


@dataclass(frozen=True)
class Sampling:
    """What the request asked for; None: the server's default (its --temperature, --top-p, --seed)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's, but vLLM's and llama.cpp's: accepted as an extension
    seed: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request: either chat ``messages`` or a completion ``prompt``."""

    model: str
    messages: tuple[Mapping[str, str], ...] | None  # chat: {"role", "content"} with text content
    prompt: str | tuple[int, ...] | None  # completion: text, or token ids
    max_tokens: int | None  # None: as many as the context leaves
    sampling: Sampling
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens, past end-of-sequence (benchmarks)
    speculate: str | None = None  # swarm's extension: "off" | "ngram" (None: the server's --speculate)

    @property
    def chat(self) -> bool:
        return self.messages is not None


# ---------------------------------------------------------------- field readers

def _number(body: Mapping, key: str, low: float, high: float, *, low_open: bool = False) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_field(key, f"must be a number, got {value!r}")
    if value > high or value < low or (low_open and value == low):
        span = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise bad_field(key, f"must be in {span}, got {value}")
    return float(value)


def _integer(body: Mapping, key: str, low: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_field(key, f"must be an integer, got {value!r}")
    if value < low:
        raise bad_field(key, f"must be at least {low}, got {value}")
    return value


def _boolean(body: Mapping, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_field(key, f"must be true or false, got {value!r}")
    return value


def _stop(body: Mapping) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_field("stop", "must be a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_field("stop", f"at most {MAX_STOP_STRINGS} stop sequences, got {len(stops)}")
    if any(s == "" for s in stops):
        raise bad_field("stop", "a stop sequence cannot be empty")
    return tuple(stops)


SPECULATE = ("off", "ngram")  # what a request may ask for (a draft model is the server's --speculate-model)


def speculate_field(body: Mapping, key: str = "speculate", param: str = "speculate") -> str | None:
    """swarm's extension: ``speculate`` "off" or "ngram" (prompt lookup) for this request; None:
    the server's default. Either way the answer is the same tokens (docs/speculative.md)."""
    value = body.get(key)
    if value is None:
        return None
    if value not in SPECULATE:
        raise bad_field(param, f"must be one of {', '.join(SPECULATE)}, got {value!r}")
    return value


def _refuse_unsupported(body: Mapping) -> None:
    """Fields that would change the answer in ways swarm does not implement."""
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise ApiError(400, f"'n': only n = 1 is supported, got {n}; send {n} requests instead", param="n",
                       code="unsupported_value")
    best_of = _integer(body, "best_of", 1)
    if best_of not in (None, 1):
        raise ApiError(400, "'best_of': only 1 is supported", param="best_of", code="unsupported_value")
    for key in ("frequency_penalty", "presence_penalty"):
        if _number(body, key, -2.0, 2.0) not in (None, 0.0):
            raise ApiError(400, f"'{key}': penalties are not supported (only 0)", param=key, code="unsupported_value")
    for key in ("logprobs", "top_logprobs", "tools", "functions", "logit_bias", "suffix", "audio", "prediction"):
        value = body.get(key)
        if value not in (None, False, [], {}, ""):
            raise ApiError(400, f"'{key}' is not supported by swarm serve", param=key, code="unsupported_parameter")
    if _boolean(body, "echo"):
        raise ApiError(400, "'echo' is not supported by swarm serve", param="echo", code="unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise ApiError(400, "'response_format': only {\"type\": \"text\"} is supported", param="response_format",
                       code="unsupported_value")


def _common(body: Mapping) -> dict[str, Any]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_field("model", "required: the name of the model (GET /v1/models lists it)")
    _refuse_unsupported(body)
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_field("stream_options", "must be an object")
    if options and not stream:
        raise bad_field("stream_options", "only allowed when 'stream' is true")
    include_usage = bool(options) and _boolean(options, "include_usage")
    sampling = Sampling(
        temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=_number(body, "top_p", 0.0, 1.0, low_open=True),
        top_k=_integer(body, "top_k", 0),
        seed=_integer(body, "seed", -(2 ** 63)),
    )
    ignore_eos = _boolean(body, "ignore_eos")
    if ignore_eos and max_tokens is None:
        raise bad_field("max_tokens", "required with 'ignore_eos'")
    return dict(model=model, max_tokens=max_tokens, sampling=sampling, stop=_stop(body), stream=stream,
                include_usage=include_usage, ignore_eos=ignore_eos, speculate=speculate_field(body))


def _text_content(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (images are refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_field(f"{where}.content[{i}]", "only text parts ({\"type\": \"text\", \"text\": ...}) "
                                                         "are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_field(f"{where}.content", "must be a string or a list of text parts")


def parse_chat_request(body: Any) -> GenerationRequest:
    """POST /v1/chat/completions, validated."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_field("messages", "required: a non-empty list of {role, content} messages")
    parsed = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_field(where, "must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise bad_field(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        # "developer" is OpenAI's newer name for the system message.
        parsed.append({"role": "system" if role == "developer" else role,
                       "content": _text_content(message.get("content"), where)})
    return GenerationRequest(messages=tuple(parsed), prompt=None, **_common(body))


def parse_completion_request(body: Any) -> GenerationRequest:
    """POST /v1/completions, validated: one prompt, as text or as token ids."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if min(prompt) < 0:
            raise bad_field("prompt", "token ids must be >= 0")
        prompt = tuple(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise bad_field("prompt", "one prompt per request (send several requests: they share the pipeline)")
    elif not isinstance(prompt, str) or not prompt:
        raise bad_field("prompt", "required: a non-empty string or a list of token ids")
    return GenerationRequest(messages=None, prompt=prompt, **_common(body))


def context_error(prompt_tokens: int, max_tokens: int | None, context: int) -> ApiError | None:
    """OpenAI's context_length_exceeded when the prompt plus max_tokens cannot fit ``context`` positions."""
    wanted = prompt_tokens + (max_tokens or 1)
    if wanted <= context:
        return None
    asked = f"{prompt_tokens} in the prompt" + (f" + {max_tokens} in max_tokens" if max_tokens else "")
    return ApiError(400, f"This model's maximum context length is {context} tokens; the request needs {wanted} "
                         f"({asked}). Shorten the prompt or lower max_tokens.",
                    param="messages" if max_tokens is None else "max_tokens", code="context_length_exceeded")


# ---------------------------------------------------------------- responses

def usage(prompt_tokens: int, completion_tokens: int, speculation: Mapping[str, int] | None = None) -> dict:
    """OpenAI's usage; with ``speculation`` (a request that speculated), swarm's extension
    ``usage.speculation``: {"verify_steps", "drafted", "accepted"} of this request."""
    counts = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
              "total_tokens": prompt_tokens + completion_tokens}
    return counts if speculation is None else {**counts, "speculation": dict(speculation)}


def chat_completion(request_id: str, created: int, model: str, text: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int, speculation: Mapping[str, int] | None = None) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens, speculation)}


def chat_chunk(request_id: str, created: int, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def text_completion(request_id: str, created: int, model: str, text: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int, speculation: Mapping[str, int] | None = None) -> dict:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens, speculation)}


def completion_chunk(request_id: str, created: int, model: str, text: str, finish_reason: str | None = None) -> dict:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(request_id: str, created: int, model: str, chat: bool, prompt_tokens: int,
                completion_tokens: int, speculation: Mapping[str, int] | None = None) -> dict:
    """The last chunk when stream_options.include_usage is set: no choices, the usage."""
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens, speculation)}


def models_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "swarm"}]}
