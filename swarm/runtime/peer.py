"""A peer process serving one ShardServer: ``python -m swarm.runtime.peer --port 0 --threads 1``.

Prints its bound address (tcp://host:port) as the first line on stdout, so that
tests and ``--local N`` can spawn peers on free ports. With --exit-on-eof it stops
when its stdin closes, so a peer never outlives the process that started it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

from swarm.runtime.server import ServerConfig, ShardServer

log = logging.getLogger(__name__)

# How long a spawned peer may take to print its address, and to exit once told to.
STARTUP_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 10.0


async def serve(config: ServerConfig, exit_on_eof: bool) -> None:
    async with ShardServer(config) as server:
        sys.stdout.write(server.address + "\n")
        sys.stdout.flush()
        if exit_on_eof:
            loop = asyncio.get_running_loop()
            # A daemon thread blocks on stdin; EOF means the parent is gone.
            threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(server.close)),
                             daemon=True).start()
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swarm.runtime.peer", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for this peer")
    parser.add_argument("--info", default="{}", help="JSON object returned by INFO (e.g. a device profile)")
    parser.add_argument("--exit-on-eof", action="store_true", help="exit when stdin closes")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s")
    # Import the model code now, while the other peers start too, so the first LOAD is quick.
    import swarm.model.shard  # noqa: F401

    config = ServerConfig(bind_host=args.host, port=args.port, threads=args.threads, info=json.loads(args.info))
    asyncio.run(serve(config, args.exit_on_eof))
    return 0


@contextmanager
def local_peers(count: int, threads: int = 1, info: dict | None = None) -> Iterator[list[str]]:
    """Start ``count`` peer processes on 127.0.0.1; yields their addresses; stops them on exit."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "swarm.runtime.peer", "--port", "0", "--threads", str(threads),
                 "--exit-on-eof", "--info", json.dumps(info or {})],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
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


if __name__ == "__main__":
    sys.exit(main())
