"""Ollama's request and response shapes, as pure functions (no I/O, no torch).

Requests of /api/chat and /api/generate become the same ``GenerationRequest`` the
OpenAI routes make, so both APIs share one generation path. Ollama's options map
onto it: temperature, top_p, top_k, seed, num_predict (-1 and -2: as many tokens
as the context leaves), stop, and swarm's own ``speculate`` ("off" | "ngram"; the last
object then carries ``speculation``, this request's drafts). Options that ask for what swarm does not implement
(penalties, mirostat, JSON format, images, tools, thinking) are refused with 400;
load-time options (num_ctx, num_gpu, num_thread, ...) are accepted and ignored:
the server's --max-len and the plan decide them. Errors leave as Ollama's
``{"error": "message"}``. Durations are nanoseconds, as Ollama's.

Without ``raw``, /api/generate applies the chat template to ``system`` and
``prompt`` (as Ollama applies the model's template): the same tokens as a chat
request with those two messages. With ``raw`` the prompt is tokenized as it is,
as /v1/completions does.
"""

from __future__ import annotations

import datetime
from typing import Any, Mapping

from swarm.serve.generation import Answer
from swarm.serve.protocol import (ApiError, GenerationRequest, Sampling, _integer, _number, _stop, bad_field,
                                  speculate_field)

ROLES = ("system", "user", "assistant")
LATEST = ":latest"  # Ollama's default tag: "name" and "name:latest" are the same model
# Options that would change the answer, with the value that asks for nothing.
UNSUPPORTED_OPTIONS = {"repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "mirostat": 0,
                       "typical_p": 1.0, "tfs_z": 1.0, "min_p": 0.0}


def same_model(asked: str, served: str) -> bool:
    return asked in (served, served + LATEST)


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


# ---------------------------------------------------------------- requests

def _object(body: Any) -> Mapping:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _model(body: Mapping) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_field("model", "required: the name of the model (GET /api/tags lists it)")
    return model


def _stream(body: Mapping) -> bool:
    value = body.get("stream", True)  # Ollama streams unless told not to
    if value is None:
        return True
    if not isinstance(value, bool):
        raise bad_field("stream", f"must be true or false, got {value!r}")
    return value


def _refuse(body: Mapping, keys: tuple[str, ...]) -> None:
    for key in keys:
        if body.get(key) not in (None, False, "", [], {}):
            raise ApiError(400, f"'{key}' is not supported by swarm serve", param=key, code="unsupported_parameter")


def _options(body: Mapping) -> dict[str, Any]:
    """max_tokens, sampling and stop of a request, from its ``options``."""
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise bad_field("options", "must be an object")
    for key, neutral in UNSUPPORTED_OPTIONS.items():
        value = options.get(key)
        if value is not None and value != neutral:
            raise ApiError(400, f"'options.{key}' is not supported by swarm serve (only {neutral})",
                           param=f"options.{key}", code="unsupported_value")
    num_predict = _integer(options, "num_predict", -2)
    if num_predict == 0:
        raise bad_field("num_predict", "must be at least 1, or -1 (until the context is full)")
    sampling = Sampling(
        temperature=_number(options, "temperature", 0.0, 2.0),
        top_p=_number(options, "top_p", 0.0, 1.0, low_open=True),
        top_k=_integer(options, "top_k", 0),
        seed=_integer(options, "seed", -(2 ** 63)),
    )
    return dict(max_tokens=num_predict if num_predict and num_predict > 0 else None, sampling=sampling,
                stop=_stop(options), speculate=speculate_field(options, param="options.speculate"))


def parse_chat(body: Any) -> GenerationRequest:
    """POST /api/chat, validated."""
    body = _object(body)
    _refuse(body, ("format", "tools", "think"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_field("messages", "required: a non-empty list of {role, content} messages")
    parsed = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_field(where, "must be an object with 'role' and 'content'")
        if message.get("role") not in ROLES:
            raise bad_field(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {message.get('role')!r}")
        if not isinstance(message.get("content", ""), str):
            raise bad_field(f"{where}.content", "must be a string")
        _refuse(message, ("images", "tool_calls"))
        parsed.append({"role": message["role"], "content": message.get("content", "")})
    return GenerationRequest(model=_model(body), messages=tuple(parsed), prompt=None, stream=_stream(body),
                             **_options(body))


def parse_generate(body: Any) -> GenerationRequest | None:
    """POST /api/generate, validated; None for a request without a prompt (Ollama's "load the model")."""
    body = _object(body)
    _refuse(body, ("format", "images", "suffix", "template", "context", "think"))
    model, stream, options = _model(body), _stream(body), _options(body)
    prompt, system = body.get("prompt") or "", body.get("system") or ""
    if not isinstance(prompt, str) or not isinstance(system, str):
        raise bad_field("prompt", "'prompt' and 'system' must be strings")
    if not prompt:
        return None
    if body.get("raw"):
        return GenerationRequest(model=model, messages=None, prompt=prompt, stream=stream, **options)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return GenerationRequest(model=model, messages=tuple(messages), prompt=None, stream=stream, **options)


# ---------------------------------------------------------------- responses

def _ns(start: float | None, end: float | None) -> int:
    return 0 if start is None or end is None else max(0, int((end - start) * 1e9))


def final_fields(answer: Answer) -> dict:
    """The counts and durations of the last object of an answer (and its drafts, if it speculated)."""
    first = answer.first_token or answer.ended
    return {"done": True, "done_reason": answer.finish_reason or "stop",
            "total_duration": _ns(answer.began, answer.ended), "load_duration": _ns(answer.began, answer.opened),
            "prompt_eval_count": answer.prompt_tokens, "prompt_eval_duration": _ns(answer.opened, first),
            "eval_count": answer.completion_tokens, "eval_duration": _ns(first, answer.ended),
            **({} if answer.speculation is None else {"speculation": answer.speculation})}


def chat_part(model: str, text: str) -> dict:
    return {"model": model, "created_at": now_rfc3339(), "message": {"role": "assistant", "content": text},
            "done": False}


def generate_part(model: str, text: str) -> dict:
    return {"model": model, "created_at": now_rfc3339(), "response": text, "done": False}


def loaded(model: str) -> dict:
    """/api/generate without a prompt: the model is loaded (here: the swarm is deployed)."""
    return {"model": model, "created_at": now_rfc3339(), "response": "", "done": True, "done_reason": "load"}


def error_body(message: str) -> dict:
    return {"error": message}


# ---------------------------------------------------------------- models

def human_count(n: int) -> str:
    """135M, 1.2B: Ollama's parameter_size."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def details(config: Mapping[str, Any], parameters: int, quant: str | None, dtype: str) -> dict:
    family = config.get("model_type", "")
    return {"parent_model": "", "format": "safetensors", "family": family, "families": [family] if family else [],
            "parameter_size": human_count(parameters), "quantization_level": (quant or dtype).upper()}


def tags(model: str, modified_at: str, size: int, digest: str, model_details: dict) -> dict:
    return {"models": [{"name": model, "model": model, "modified_at": modified_at, "size": size, "digest": digest,
                        "details": model_details}]}


def show(config: Mapping[str, Any], parameters: int, model_details: dict, template: str, max_len: int,
         modified_at: str, defaults: Mapping[str, Any]) -> dict:
    """/api/show: what Ollama says of a model; context_length is the server's --max-len per request."""
    arch = config.get("model_type", "")
    info = {"general.architecture": arch, "general.parameter_count": parameters,
            f"{arch}.context_length": max_len, f"{arch}.embedding_length": config.get("hidden_size"),
            f"{arch}.block_count": config.get("num_hidden_layers"),
            f"{arch}.attention.head_count": config.get("num_attention_heads"),
            f"{arch}.attention.head_count_kv": config.get("num_key_value_heads"),
            f"{arch}.vocab_size": config.get("vocab_size")}
    parameters_text = "\n".join(f"{key} {value}" for key, value in defaults.items() if value is not None)
    return {"license": "", "modelfile": "", "parameters": parameters_text, "template": template,
            "details": model_details, "model_info": info, "capabilities": ["completion"], "modified_at": modified_at}
