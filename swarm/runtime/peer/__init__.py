"""Peer processes: ``python -m swarm.runtime.peer --port 0 --threads 1`` serves one ShardServer.

The process prints its bound address (tcp://host:port) as the first line on stdout,
so that tests and ``--local N`` can spawn peers on free ports; with --exit-on-eof it
stops when its stdin closes, so a peer never outlives the process that started it.
(The terminal side lives in __main__.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from swarm.runtime.server import ServerConfig, ShardServer

# How long a spawned peer may take to exit once told to.
EXIT_TIMEOUT_S = 10.0


async def serve(config: ServerConfig, on_ready: Callable[[ShardServer], None] | None = None) -> None:
    """Serve until ``server.close()``; on_ready(server) runs once the socket is bound."""
    async with ShardServer(config) as server:
        if on_ready is not None:
            on_ready(server)
        await server.serve_forever()


@contextmanager
def local_peers(count: int, threads: int = 1, info: dict | None = None, args: Sequence[str] = (),
                secret: str | None = None, env: dict[str, str] | None = None) -> Iterator[list[str]]:
    """Start ``count`` peer processes on 127.0.0.1; yields their addresses; stops them on exit.

    They join this process's swarm (SWARM_SECRET, inherited), or the one whose join code is
    ``secret``; ``args`` are more peer options (``--insecure``, limits, ``--no-local-paths``);
    ``env``, more environment variables (``SWARM_CACHE_DIR``: a cache of their own)."""
    from swarm.secret import ENV_VARIABLE

    env = {**os.environ, **(env or {}), **({} if secret is None else {ENV_VARIABLE: secret})}
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "swarm.runtime.peer", "--port", "0", "--threads", str(threads),
                 "--exit-on-eof", "--info", json.dumps(info or {}), *args],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            ))
        addresses = []
        for proc in procs:
            line = proc.stdout.readline().strip()
            if not line.startswith("tcp://"):
                raise RuntimeError(f"peer process {proc.pid} did not start (exit code {proc.poll()})")
            addresses.append(line)
        yield addresses
    finally:
        for proc in procs:
            proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
