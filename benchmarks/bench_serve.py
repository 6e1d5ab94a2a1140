"""`swarm serve` under load: aggregate tokens/s and time to first token by concurrency.

    python benchmarks/bench_serve.py [--json] [--concurrency 1,4,8,16,32] [--url http://127.0.0.1:8000]

Without --url it starts `swarm serve --local 2` on a free loopback port (stopped at the
end). Each level runs ``concurrency`` streaming clients, each sending
--requests-per-client chat requests one after another, every answer exactly
--max-tokens long (vLLM's ``ignore_eos``), all at temperature 0. Aggregate tokens/s
is every completion token of the level over the level's wall time; time to first
token is from sending a request to its first text. Levels run back to back against
one server, so their ratios are side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

QUESTIONS = ["Tell me a story about a {}.", "Describe a {} in detail.", "Write a poem about a {}.",
             "Explain how a {} works."]
THINGS = ["dragon", "robot", "river", "city", "forest", "clock", "ship", "garden"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def one_request(http: aiohttp.ClientSession, url: str, model: str, key: str, n: int,
                      max_tokens: int) -> tuple[float, int]:
    """(seconds to the first text, completion tokens) of one streamed chat answer."""
    body = {"model": model, "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": QUESTIONS[n % 4].format(THINGS[n % 8])}]}
    began, first, tokens = time.perf_counter(), None, 0
    async with http.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        async for line in r.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - began
    return first or 0.0, tokens


async def level(url: str, model: str, key: str, concurrency: int, per_client: int, max_tokens: int) -> dict:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=1800)) as http:
        async def client(c: int) -> list[tuple[float, int]]:
            return [await one_request(http, url, model, key, c * per_client + i, max_tokens)
                    for i in range(per_client)]

        began = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(c) for c in range(concurrency))) for r in rs]
        wall = time.perf_counter() - began
    ttft = [first for first, _ in results]
    tokens = sum(n for _, n in results)
    return {"concurrency": concurrency, "requests": len(results), "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "ttft_p50_s": round(statistics.median(ttft), 3),
            "ttft_p95_s": round(percentile(ttft, 0.95), 3)}


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "swarm", "serve", "--local", str(args.local), "--port", "0", "--api-key", args.key,
           "--max-len", str(args.max_len), "--micro-batches", str(args.micro_batches),
           "--batch-size", str(args.batch_size), "--threads", "1"]
    if args.model:
        cmd += ["--model", args.model]
    log = open(Path(args.log), "wb")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out, deadline = b"", time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            out += os.read(proc.stdout.fileno(), 65536)
            if match := re.search(rb"(http://\S+)/v1", out):
                return proc, match.group(1).decode()
    proc.kill()
    raise SystemExit(f"swarm serve did not start:\n{out.decode(errors='replace')}\n(see {args.log})")


async def run(args: argparse.Namespace, url: str) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {args.key}"}) as r:
            model = (await r.json())["data"][0]["id"]
    await level(url, model, args.key, 2, 1, 4)  # warm-up: first steps load kernels and caches
    levels = []
    for concurrency in args.concurrency:
        levels.append(await level(url, model, args.key, concurrency, args.requests_per_client, args.max_tokens))
        if not args.json:
            r = levels[-1]
            print(f"concurrency {r['concurrency']:>3}: {r['tokens_per_s']:8.1f} tok/s aggregate, "
                  f"TTFT p50 {r['ttft_p50_s']:.3f} s p95 {r['ttft_p95_s']:.3f} s "
                  f"({r['requests']} requests, {r['tokens']} tokens in {r['wall_s']:.1f} s)", flush=True)
    by = {r["concurrency"]: r["tokens_per_s"] for r in levels}
    return {"model": model, "url": url, "max_tokens": args.max_tokens, "requests_per_client": args.requests_per_client,
            "layout": {"micro_batches": args.micro_batches, "batch_size": args.batch_size, "local_peers": args.local},
            "load_average": os.getloadavg(), "levels": levels,
            "speedup_8_vs_1": round(by[8] / by[1], 2) if 1 in by and 8 in by else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--url", default=None, help="a running swarm serve (default: start one with --local)")
    parser.add_argument("--key", default="bench", help="API key (the started server requires it)")
    parser.add_argument("--concurrency", default="1,4,8,16,32", type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--local", type=int, default=2, help="local peers of the started server")
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--model", default=None)
    parser.add_argument("--log", default="bench_serve.log", help="the started server's log")
    args = parser.parse_args()
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args)
    try:
        result = asyncio.run(run(args, url))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"speedup at concurrency 8 over 1: {result['speedup_8_vs_1']}x (load average {result['load_average']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
