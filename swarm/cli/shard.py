"""`swarm serve-shard`: one shard server and nothing else (no discovery, no profile): the
peer that tests and benchmarks start on loopback (``swarm.localswarm.local_peers``).

It prints its bound address (tcp://host:port) as the first line on stdout, so that its
parent can start it on a free port; with --exit-on-eof it stops when its stdin closes,
so it never outlives the process that started it."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import threading


def add_parser(subparsers) -> argparse.ArgumentParser:
    from swarm.runtime.wire import DEFAULT_LIMITS

    parser = subparsers.add_parser("serve-shard", help="serve one shard server (tests, benchmarks)",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--data-port", type=int, default=0, help="port pipeline steps arrive on (0: any free)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for this peer")
    parser.add_argument("--info", default="{}", help="JSON object returned by INFO (e.g. a device profile)")
    parser.add_argument("--exit-on-eof", action="store_true", help="exit when stdin closes")
    parser.add_argument("--insecure", action="store_true", help="plain TCP, no CURVE (default: the swarm of "
                        "SWARM_SECRET or the stored secret)")
    parser.add_argument("--max-tensor-bytes", type=int, default=DEFAULT_LIMITS.max_tensor_bytes,
                        help="largest tensor (and frame) accepted; a larger frame drops its sender")
    parser.add_argument("--max-queued-bytes", type=int, default=DEFAULT_LIMITS.max_queued_bytes_per_client,
                        help="bytes one client may have queued on the data socket")
    parser.add_argument("--no-local-paths", action="store_true",
                        help="never read a LOAD's model path from this machine's disk: weights come from this "
                             "peer's unit cache or from the LOAD's holder (as on another machine)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from swarm import secret
    from swarm.runtime.server import ServerConfig, ShardServer
    from swarm.runtime.wire import DEFAULT_LIMITS

    # Import the model code now, while the other peers start too, so the first LOAD is quick.
    import swarm.model.shard  # noqa: F401

    if args.insecure:
        print("warning: --insecure: this peer's sockets are neither encrypted nor authenticated", file=sys.stderr)
        secret.use(secret.INSECURE)
    limits = dataclasses.replace(DEFAULT_LIMITS, max_tensor_bytes=args.max_tensor_bytes,
                                 max_queued_bytes_per_client=args.max_queued_bytes)
    config = ServerConfig(bind_host=args.host, port=args.port, data_port=args.data_port, threads=args.threads,
                          info=json.loads(args.info), limits=limits, local_paths=not args.no_local_paths)

    async def serve() -> None:
        async with ShardServer(config) as server:
            print(server.address, flush=True)
            if args.exit_on_eof:
                loop = asyncio.get_running_loop()
                # A daemon thread blocks on stdin; EOF means the parent is gone.
                threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(server.close)),
                                 daemon=True).start()
            await server.serve_forever()

    asyncio.run(serve())
    return 0
