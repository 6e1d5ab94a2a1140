"""Reading a request's JSON body, the same way for every API of the server."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from swarm.serve.protocol import ApiError

MAX_BODY_BYTES = 8 * 2 ** 20


async def json_body(request: web.Request) -> Any:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes") from None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
