"""Ollama's HTTP API over the same generator as the OpenAI routes.

Routes: POST /api/chat, POST /api/generate (NDJSON streams unless ``"stream": false``),
GET /api/tags, POST /api/show, GET /api/version, GET /api/ps. The shapes are in
swarm.serve.ollama; the API key guards these as it guards /v1 (the app's middleware).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import struct
from pathlib import Path
from typing import Any

from aiohttp import web

from swarm import __version__
from swarm.serve import ollama
from swarm.serve.http import json_body
from swarm.serve.protocol import ApiError, GenerationRequest

log = logging.getLogger(__name__)


def ndjson(payload: dict) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def safetensors_parameters(model_dir: Path) -> int:
    """Parameters in the folder's safetensors files, from their headers (no tensor is read)."""
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, tensor in header.items():
            if name != "__metadata__":
                count = 1
                for dim in tensor["shape"]:
                    count *= dim
                total += count
    return total


class OllamaApi:
    """The /api routes of one ApiServer (its config, generator, source and tokenizer)."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self._model_facts: dict | None = None

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/api/chat", self.chat)
        app.router.add_post("/api/generate", self.generate)
        app.router.add_get("/api/tags", self.tags)
        app.router.add_post("/api/show", self.show)
        app.router.add_get("/api/version", self.version)
        app.router.add_get("/api/ps", self.ps)

    @property
    def model(self) -> str:
        return self.server.config.model

    def _check_model(self, asked: str) -> None:
        if not ollama.same_model(asked, self.model):
            raise ApiError(404, f"model '{asked}' not found; this server serves '{self.model}'", param="model",
                           code="model_not_found")

    # ------------------------------------------------------------ generation

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, ollama.parse_chat(await json_body(request)), ollama.chat_part)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        req = ollama.parse_generate(body)
        if req is None:  # no prompt: Ollama's way to load a model ahead of use
            self._check_model(body["model"])
            async with await self.server.generator.open_session(self.server.generator.defaults):
                return web.json_response(ollama.loaded(self.model))
        return await self._answer(request, req, ollama.generate_part)

    async def _answer(self, request: web.Request, req: GenerationRequest, part) -> web.StreamResponse:
        self._check_model(req.model)
        async with self.server.generator.answer(req) as (deltas, answer):
            if not req.stream:
                text = "".join([delta async for delta in deltas])
                return web.json_response({**part(self.model, text), **ollama.final_fields(answer)})
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await response.prepare(request)
            # Once the headers are sent, an error travels as the stream's last line (as Ollama's).
            try:
                async for delta in deltas:
                    await response.write(ndjson(part(self.model, delta)))
            except ApiError as exc:
                await response.write(ndjson(ollama.error_body(exc.message)))
                await response.write_eof()
                return response
            except Exception as exc:
                log.exception("%s failed mid-stream", request.path)
                await response.write(ndjson(ollama.error_body(f"internal error: {type(exc).__name__}: {exc}")))
                await response.write_eof()
                return response
        await response.write(ndjson({**part(self.model, ""), **ollama.final_fields(answer)}))
        await response.write_eof()
        return response

    # ------------------------------------------------------------ models

    async def _facts(self) -> dict:
        """What /api/tags and /api/show say of the model, read once from its folder."""
        if self._model_facts is None:
            self._model_facts = await asyncio.to_thread(self._read_facts)
        return self._model_facts

    def _read_facts(self) -> dict:
        from swarm.model.store import model_fingerprint

        source = self.server.source
        model_dir = Path(source.model_dir or source.config.model)
        config = json.loads((model_dir / "config.json").read_text())
        files = [p for p in model_dir.iterdir() if p.is_file()]
        modified = max(p.stat().st_mtime for p in files)
        parameters = safetensors_parameters(model_dir)
        return {"config": config, "parameters": parameters, "size": sum(p.stat().st_size for p in files),
                "digest": model_fingerprint(model_dir),
                "modified_at": datetime.datetime.fromtimestamp(modified, datetime.timezone.utc).isoformat(),
                "details": ollama.details(config, parameters, source.config.quant, source.config.dtype)}

    async def tags(self, request: web.Request) -> web.Response:
        f = await self._facts()
        return web.json_response(ollama.tags(self.model, f["modified_at"], f["size"], f["digest"], f["details"]))

    async def ps(self, request: web.Request) -> web.Response:
        f = await self._facts()
        body = ollama.tags(self.model, f["modified_at"], f["size"], f["digest"], f["details"])
        for entry in body["models"]:
            entry.pop("modified_at")
            entry.update(expires_at="9999-12-31T23:59:59Z", size_vram=0, context_length=self.server.config.max_len)
        return web.json_response(body)

    async def show(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        asked = body.get("model") or body.get("name") if isinstance(body, dict) else None
        if not isinstance(asked, str) or not asked:
            raise ApiError(400, "'model': required: the name of the model (GET /api/tags lists it)", param="model")
        self._check_model(asked)
        f = await self._facts()
        d = self.server.config.defaults
        defaults = {"temperature": d.temperature, "top_k": d.top_k, "top_p": d.top_p, "seed": d.seed}
        template = getattr(self.server.generator.tokenizer, "chat_template", None) or ""
        return web.json_response(ollama.show(f["config"], f["parameters"], f["details"], template,
                                             self.server.config.max_len, f["modified_at"], defaults))

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": __version__})
