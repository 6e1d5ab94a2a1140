"""The web page's routes without a browser: the package's files with a strict CSP, the
swarm's state pushed as server-sent events (the key also as ?key=, on that route
only), the join command and its QR code for key holders, and the state's JSON."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import aiohttp
import pytest

from swarm.model import hf
from swarm.planner.plan import Plan, PlannedStage
from swarm.runtime.recovery import RecoveryEvent
from swarm.runtime.stats import StageStats
from swarm.serve.app import ApiServer, ServeConfig
from swarm.serve.state import swarm_json
from swarm.serve.web import STATIC_DIR, is_loopback
from swarm.source import SourceConfig, SwarmSource
from swarm.source_state import SourceState

KEY = "sk-web"
JOIN = "swarm join --join-code abcd-efgh"


@pytest.fixture
async def source(tiny_model_dir):
    config = SourceConfig(interfaces=["127.0.0.1"], model=tiny_model_dir, mdns=False, mem_bytes=1000,
                          discovery_s=0.0, objective="cycle", max_len=64)
    async with SwarmSource(config) as s:
        yield s


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return hf.load_tokenizer(smollm2_dir)


def api(source, tokenizer, **fields) -> ApiServer:
    config = ServeConfig(model="tiny", max_len=64, port=0, events_interval_s=0.05, **fields)
    return ApiServer(config, source, tokenizer, stop_ids={2})


async def get(url: str, key: str | None = None) -> tuple[int, dict, bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=headers) as response:
            return response.status, dict(response.headers), await response.read()


async def first_event(url: str) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as response:
            assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream"
            async for line in response.content:
                if line.startswith(b"data: "):
                    return json.loads(line[6:])
    raise AssertionError("no event")


async def test_the_page_is_the_packages_own_files_under_a_strict_csp(source, tokenizer):
    async with api(source, tokenizer, api_key=KEY) as server:
        for path, kind in (("/", "text/html"), ("/static/app.js", "javascript"), ("/static/app.css", "text/css")):
            status, headers, body = await get(server.url + path)  # the page itself needs no key
            assert status == 200 and kind in headers["Content-Type"] and body, path
            assert "default-src 'none'" in headers["Content-Security-Policy"]
            assert headers["X-Content-Type-Options"] == "nosniff"
        for path in ("/static/nothing.js", "/static/..%2Fapp.py", "/static/%2E%2E/web.py"):
            assert (await get(server.url + path))[0] == 404, path
    html = (STATIC_DIR / "index.html").read_text()
    assert "http" not in html.replace('"http-equiv"', "")  # nothing from elsewhere (no CDN)


def test_the_static_files_are_package_data():
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["swarm.serve"]
    shipped = {p.name for pattern in patterns for p in STATIC_DIR.parent.glob(pattern)}
    assert shipped == {"index.html", "app.js", "app.css"} == {p.name for p in STATIC_DIR.iterdir()}


async def test_the_events_take_the_key_as_a_header_or_in_the_query(source, tokenizer):
    async with api(source, tokenizer, api_key=KEY) as server:
        event = await first_event(server.url + f"/api/swarm/events?key={KEY}")
        assert event["deployed"] is False and event["plan"] is None and event["recoveries"] == []
        assert event["peers"][0]["name"] == "source" and event["requests"]["served"] == 0
        status, _, body = await get(server.url + "/api/swarm/events?key=wrong")
        assert status == 401 and json.loads(body) == {"error": "incorrect API key provided"}
        assert (await get(server.url + "/api/swarm/events"))[0] == 401
        assert (await get(server.url + f"/api/tags?key={KEY}"))[0] == 401  # that route only
        assert (await get(server.url + f"/v1/models?key={KEY}"))[0] == 401


async def test_the_join_command_and_its_qr_code_go_to_key_holders(source, tokenizer):
    async with api(source, tokenizer, api_key=KEY, join_command=JOIN) as server:
        assert (await get(server.url + "/api/swarm/join"))[0] == 401
        assert (await get(server.url + "/api/swarm/join.svg"))[0] == 401
        status, headers, body = await get(server.url + "/api/swarm/join", KEY)
        assert status == 200 and json.loads(body) == {"command": JOIN} and headers["Cache-Control"] == "no-store"
        status, headers, body = await get(server.url + "/api/swarm/join.svg", KEY)
        assert status == 200 and headers["Content-Type"] == "image/svg+xml"
        assert b"<svg" in body and b"<title>swarm join command</title>" in body
    # Without a key set: this machine's own browser (loopback) only.
    async with api(source, tokenizer, join_command=JOIN) as server:
        assert json.loads((await get(server.url + "/api/swarm/join"))[2]) == {"command": JOIN}
    async with api(source, tokenizer) as server:  # --no-swarm: nothing to join
        status, _, body = await get(server.url + "/api/swarm/join")
        assert status == 404 and "--no-swarm" in json.loads(body)["error"]


def test_only_loopback_addresses_count_as_this_machine():
    assert is_loopback("127.0.0.1") and is_loopback("::1")
    assert not is_loopback("192.168.1.20") and not is_loopback(None) and not is_loopback("not an address")


def test_the_state_json_puts_predictions_beside_measurements_and_recoveries_in_words():
    plan = Plan(stages=(PlannedStage(0, 0, 2), PlannedStage(1, 2, 6)), latency_s=0.05, bottleneck_s=0.03,
                cycle_s=0.04, inflight=2, compute_s=(0.01, 0.03), hop_s=(0.001, 0.001), mem_used=(10.0, 20.0),
                objective="cycle")
    state = SourceState(
        source_id="s", source_name="laptop", source_profile={"units": [{}] * 6}, source_mem=100,
        problem={"peer_ids": ["s", "p"], "devices": [{"name": "laptop"}, {"name": "pi"}]}, plan=plan,
        stats=(StageStats(None, 0, 2, 0.2, 30.0, 30.0, 0), StageStats("tcp://x", 2, 6, 0.7, 30.0, 30.0, 1)),
        model="m", deployed=True,
        recoveries=(RecoveryEvent(("pi",), 1, 0.5, 1.0, 0.2, 2), RecoveryEvent(("pi",), 0, 0.5, 0, 0, 1, "boom")))
    body = swarm_json(state, {"active": 0})
    stages = body["plan"]["stages"]
    assert [(s["peer"], s["busy_share"], s["predicted_busy_share"]) for s in stages] == \
        [("laptop", 0.2, 0.25), ("pi", 0.7, 0.75)]
    assert stages[1]["predicted_step_ms"] == pytest.approx(30.0) and body["plan"]["predicted_tokens_per_s"] == 20.0
    assert [r["text"] for r in body["recoveries"]] == ["peer pi lost; re-planned over 1 peer in 1.2 s",
                                                       "peer pi lost; recovery failed: boom"]
    assert body["deployed"] is True and body["peers"][1]["alive"] is False  # planned, not announced: lost


def test_the_state_json_shows_the_weights_moving_to_peers_in_words():
    state = SourceState(source_id="s", source_name="laptop", source_profile={"units": []}, source_mem=100,
                        transfers={"pi": {"done": 12_000_000, "total": 40_000_000, "rate_bps": 8_000_000.0}})
    assert swarm_json(state, {})["transfers"] == [
        {"peer": "pi", "done": 12_000_000, "total": 40_000_000, "rate_bps": 8_000_000.0,
         "text": "pi receiving weights: 12.0 MB / 40.0 MB at 8.0 MB/s, 4 s left"}]
    assert swarm_json(dataclasses.replace(state, transfers={}), {})["transfers"] == []
