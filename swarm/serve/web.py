"""The web page of `swarm serve` and the routes only it uses.

GET / and /static/*: hand-written files shipped in the package (swarm/serve/static),
with a Content-Security-Policy that allows nothing from elsewhere. GET
/api/swarm/events: the swarm's state (swarm.serve.state) as server-sent events,
one each interval and at once on connecting; it is the one route that takes the
API key as ``?key=`` too (EventSource cannot send headers). GET /api/swarm/join and
/api/swarm/join.svg: the `swarm join` line for another device and its QR code.
The API key guards all three (the app's middleware); without a key set, the join
line goes only to this machine's own browser (loopback), since it is the swarm's
secret.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import logging
from pathlib import Path
from typing import Any

from aiohttp import web

from swarm.serve.protocol import ApiError

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
EVENTS_INTERVAL_S = 1.0  # between two pushes of the swarm's state to a web page
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def qr_svg(text: str) -> bytes:
    """The QR code of ``text`` as an SVG image (dark on white, a quiet zone around it)."""
    import segno

    out = io.BytesIO()
    segno.make(text, error="m").save(out, kind="svg", scale=4, border=4, dark="#111", light="#fff",
                                     title="swarm join command")
    return out.getvalue()


def is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


class WebPage:
    """The page's routes over one ApiServer (its config and its swarm_state())."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self.index)
        app.router.add_get("/static/{name}", self.static)
        app.router.add_get("/api/swarm/events", self.events)
        app.router.add_get("/api/swarm/join", self.join)
        app.router.add_get("/api/swarm/join.svg", self.join_qr)

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        files = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file()}
        if name not in files:  # only the package's own files, by exact name
            raise web.HTTPNotFound()
        return web.FileResponse(files[name], headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

    async def events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        interval = self.server.config.events_interval_s
        # Ends when the client goes away (its handler is cancelled) or the server stops.
        while True:
            payload = json.dumps(self.server.swarm_state(), separators=(",", ":"), ensure_ascii=False)
            await response.write(f"retry: 2000\ndata: {payload}\n\n".encode())
            await asyncio.sleep(interval)

    def _join_command(self, request: web.Request) -> str:
        if self.server.config.api_key is None and not is_loopback(request.remote):
            raise ApiError(403, "the join code is the swarm's secret: it is shown only on this machine's own "
                                "browser, or to holders of the API key when swarm serve runs with --api-key",
                           code="forbidden")
        command = self.server.config.join_command
        if command is None:
            raise ApiError(404, "this server runs the whole model itself (--no-swarm): no device can join it; "
                                "start it without --no-swarm to share the work", code="no_swarm")
        return command

    async def join(self, request: web.Request) -> web.Response:
        return web.json_response({"command": self._join_command(request)}, headers={"Cache-Control": "no-store"})

    async def join_qr(self, request: web.Request) -> web.Response:
        svg = await asyncio.to_thread(qr_svg, self._join_command(request))
        return web.Response(body=svg, content_type="image/svg+xml", headers={"Cache-Control": "no-store"})
