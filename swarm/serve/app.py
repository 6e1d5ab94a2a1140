"""The HTTP APIs of a swarm source (OpenAI's, Ollama's) and its web page, on aiohttp.

    async with ApiServer(ServeConfig(model="SmolLM2", max_len=1024), source, tokenizer, stop_ids) as server:
        print(server.url)        # http://127.0.0.1:8000
        await forever

Routes: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions,
GET /v1/swarm; Ollama's under /api (swarm.serve.ollama_api), both over one Generator.
Errors of every kind leave in OpenAI's JSON shape (Ollama's under /api). A client that
goes away mid-answer cancels its handler (aiohttp's handler_cancellation), which
closes its session: the slot is free for the next request after the step in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
import dataclasses
from dataclasses import dataclass
from typing import Any, Collection

from aiohttp import web

from swarm.model.sampling import GREEDY, SamplingParams
from swarm.serve import protocol
from swarm.serve.generation import Answer, Generator
from swarm.serve.http import MAX_BODY_BYTES, json_body
from swarm.serve.ollama_api import OllamaApi
from swarm.serve.web import EVENTS_INTERVAL_S, WebPage
from swarm.serve.protocol import ApiError, GenerationRequest
from swarm.serve.state import swarm_json
from swarm.serve.text import SSE_DONE, sse_event

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 1.0  # per-stage busy share and tokens/s are measured over this interval
SHUTDOWN_GRACE_S = 3.0  # on Ctrl-C, answers still running get this long before they are cancelled
GUARDED = ("/v1/", "/api/")  # what the API key guards (/health and the web page's files are open)
KEY_IN_QUERY = frozenset({"/api/swarm/events"})  # the one route that also takes ?key= (an EventSource)


@dataclass(frozen=True)
class ServeConfig:
    model: str  # the name /v1/models lists and requests must ask for
    max_len: int  # context positions per request (the KV slot): prompt + max_tokens
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (see ApiServer.url)
    api_key: str | None = None  # when set, every /v1 and /api request needs "Authorization: Bearer KEY"
    defaults: SamplingParams = GREEDY  # for requests that leave temperature / top_p / seed out
    stats_interval_s: float = STATS_INTERVAL_S
    events_interval_s: float = EVENTS_INTERVAL_S  # between pushes of the swarm's state to the web page
    join_command: str | None = None  # `swarm join --join-code ...` for another device; None: --no-swarm
    shutdown_grace_s: float = SHUTDOWN_GRACE_S


class ApiServer:
    """The HTTP server over one SwarmSource. ``async with`` binds and unbinds; idempotent close."""

    def __init__(self, config: ServeConfig, source: Any, tokenizer: Any, stop_ids: Collection[int]) -> None:
        self.config = config
        self.source = source
        self.generator = Generator(source, tokenizer, config.max_len, config.defaults, stop_ids)
        self.started = int(time.time())
        self._runner: web.AppRunner | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._tokens_per_s: float | None = None
        self.port = config.port

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._auth], client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/swarm", self.swarm)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        OllamaApi(self).add_routes(app)
        WebPage(self).add_routes(app)
        return app

    async def __aenter__(self) -> "ApiServer":
        self._stack = contextlib.AsyncExitStack()
        try:
            # handler_cancellation: a client that disconnects cancels its handler, which frees its slot.
            self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None,
                                         shutdown_timeout=self.config.shutdown_grace_s)
            await self._runner.setup()
            self._stack.push_async_callback(self._runner.cleanup)
            site = web.TCPSite(self._runner, self.config.host, self.config.port)
            await site.start()
            self.port = self._runner.addresses[0][1]
            tasks = await self._stack.enter_async_context(asyncio.TaskGroup())
            poller = tasks.create_task(self._poll_stats())
            self._stack.callback(poller.cancel)  # runs before the TaskGroup waits for it
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    # ------------------------------------------------------------ middleware

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return _error_response(request, exc)
        except web.HTTPException as exc:  # aiohttp's own: unknown route, wrong method, body too large
            if exc.status < 400:
                raise
            error = ApiError(exc.status, f"{exc.reason}: {request.method} {request.path}",
                             code="not_found" if exc.status == 404 else None)
            return _error_response(request, error, {k: v for k, v in exc.headers.items() if k == "Allow"})
        except Exception as exc:  # a bug or a failure nobody foresaw: the client still gets JSON
            log.exception("%s %s failed", request.method, request.path)
            return _error_response(request, ApiError(500, f"internal error: {type(exc).__name__}: {exc}",
                                                     type="server_error"))

    @web.middleware
    async def _auth(self, request: web.Request, handler) -> web.StreamResponse:
        key = self.config.api_key
        if key is not None and request.path.startswith(GUARDED):
            given = request.headers.get("Authorization", "")
            if not given and request.path in KEY_IN_QUERY and "key" in request.query:
                given = "Bearer " + request.query["key"]  # EventSource cannot send headers
            scheme, _, token = given.partition(" ")
            if not given:
                raise ApiError(401, "missing API key: send the header 'Authorization: Bearer KEY' "
                                    "(the key swarm serve was started with, --api-key)", code="invalid_api_key")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                raise ApiError(401, "incorrect API key provided", code="invalid_api_key")
        return await handler(request)

    # ------------------------------------------------------------ routes

    async def health(self, request: web.Request) -> web.Response:
        g = self.generator
        return web.json_response({"status": "ok", "model": self.config.model, "active": g.active,
                                  "waiting": g.waiting})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(protocol.models_list(self.config.model, self.started))

    async def swarm(self, request: web.Request) -> web.Response:
        return web.json_response(self.swarm_state())

    def swarm_state(self) -> dict:
        """What /v1/swarm answers and /api/swarm/events pushes: the source's state() as JSON."""
        state = dataclasses.replace(self.source.state(), model=self.config.model, tokens_per_s=self._tokens_per_s)
        g = self.generator
        counts = {"active": g.active, "waiting": g.waiting, "served": g.served, "generated_tokens": g.generated}
        return swarm_json(state, counts)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, protocol.parse_chat_request(await json_body(request)))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, protocol.parse_completion_request(await json_body(request)))

    # ------------------------------------------------------------ generation

    async def _generate(self, request: web.Request, req: GenerationRequest) -> web.StreamResponse:
        if req.model != self.config.model:
            raise ApiError(404, f"The model '{req.model}' does not exist; this server serves '{self.config.model}'",
                           param="model", code="model_not_found")
        request_id = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        async with self.generator.answer(req) as (deltas, answer):
            if req.stream:
                return await self._stream(request, req, deltas, answer, request_id, created)
            text = "".join([delta async for delta in deltas])
        build = protocol.chat_completion if req.chat else protocol.text_completion
        return web.json_response(build(request_id, created, self.config.model, text, answer.finish_reason,
                                       answer.prompt_tokens, answer.completion_tokens, answer.speculation))

    async def _stream(self, request: web.Request, req: GenerationRequest, deltas, answer: Answer,
                      request_id: str, created: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        model = self.config.model

        def chunk(text: str | None, finish: str | None = None) -> dict:
            if req.chat:
                delta = {} if text is None else {"content": text}
                return protocol.chat_chunk(request_id, created, model, delta, finish)
            return protocol.completion_chunk(request_id, created, model, text or "", finish)

        if req.chat:  # OpenAI's first chunk names the role
            await response.write(sse_event(protocol.chat_chunk(request_id, created, model,
                                                               {"role": "assistant", "content": ""})))
        # Once the headers are sent, an error travels as the stream's last event.
        try:
            async for delta in deltas:
                await response.write(sse_event(chunk(delta)))
        except ApiError as exc:
            return await _end_with_error(response, exc)
        except Exception as exc:  # e.g. the pipeline closed under a running answer (Ctrl-C)
            log.exception("%s failed mid-stream", request.path)
            return await _end_with_error(response, ApiError(500, f"internal error: {type(exc).__name__}: {exc}",
                                                            type="server_error"))
        await response.write(sse_event(chunk(None, answer.finish_reason)))
        if req.include_usage:
            await response.write(sse_event(protocol.usage_chunk(request_id, created, model, req.chat,
                                                                answer.prompt_tokens, answer.completion_tokens,
                                                                answer.speculation)))
        await response.write(SSE_DONE)
        await response.write_eof()
        return response

    # ------------------------------------------------------------ live statistics

    async def _poll_stats(self) -> None:
        """The server's tokens/s over each interval (what /v1/swarm shows; the source polls the stages)."""
        before, then = self.generator.generated, time.monotonic()
        while True:
            await asyncio.sleep(self.config.stats_interval_s)
            now, generated = time.monotonic(), self.generator.generated
            self._tokens_per_s = (generated - before) / max(now - then, 1e-9)
            before, then = generated, now


async def _end_with_error(response: web.StreamResponse, error: ApiError) -> web.StreamResponse:
    await response.write(sse_event(error.body()))
    await response.write_eof()
    return response


def _error_response(request: web.Request, error: ApiError, headers: dict | None = None) -> web.Response:
    """OpenAI's error JSON, or Ollama's ``{"error": message}`` under /api/."""
    body = {"error": error.message} if request.path.startswith("/api/") else error.body()
    return web.json_response(body, status=error.status, headers=headers)
