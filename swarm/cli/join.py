"""`swarm join`: profile this device for the model (cached), serve shards, announce it."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import socket
import sys
from pathlib import Path

from swarm.cli.common import add_secret_arguments, use_swarm_secret

LONELY_S = 10.0  # after this long alone, say what discovery tried and heard

DEFAULT_INTERFACES_HELP = ("IPv4 address of an interface to announce on (repeatable). Default: every "
                           "interface (a home network). On shared machines pass 127.0.0.1.")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("join", help="profile this device, serve shards and announce it",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model folder (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--name", default=socket.gethostname(), help="name shown to other peers")
    p.add_argument("--mem", type=parse_bytes, help="usable memory limit, e.g. 2G or 512M")
    p.add_argument("--threads", type=int, default=1, help="torch threads for this peer (default 1)")
    add_network_args(p)
    p.add_argument("--port", type=int, default=0, help="shard server (control) port (default: any free port)")
    p.add_argument("--data-port", type=int,
                   help="port pipeline steps arrive on (default: --port + 1 when --port is given, else any free port)")
    p.add_argument("--profile", type=Path, help="use this measured profile JSON instead of profiling")
    p.add_argument("--heartbeat", type=float, help="seconds between heartbeats (default 1.0)")
    p.add_argument("--probe-interval", type=float, help="seconds between link measurements (default 30)")
    add_secret_arguments(p)
    p.set_defaults(func=run)
    return p


def add_network_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interface", action="append", metavar="IP", help=DEFAULT_INTERFACES_HELP)
    p.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                   help="a peer's shard server to ask directly, for networks that block multicast (repeatable)")
    p.add_argument("--no-mdns", dest="mdns", action="store_false",
                   help="no multicast at all: find peers through --peer seeds only")


def interfaces_from(args):
    from swarm.discovery.mdns import HOME_INTERFACES

    return list(args.interface) if args.interface else HOME_INTERFACES


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2G or 512M)")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2) or "_"))


def load_profile(args, model_dir) -> dict:
    if args.profile:
        return json.loads(args.profile.read_text())
    from swarm.discovery.peer import measure_profile

    return measure_profile(model_dir, args.threads, args.mem)


def run(args) -> int:
    import torch

    use_swarm_secret(args, store=True)
    torch.set_num_threads(args.threads)
    from swarm.discovery.links import ProbeConfig
    from swarm.discovery.liveness import LivenessConfig
    from swarm.discovery.peer import PeerConfig, SwarmPeer

    from rich.console import Console

    from swarm.cli.common import resolve_model_or_exit

    model_dir = resolve_model_or_exit(args.model, Console(stderr=True))
    profile = load_profile(args, model_dir)
    mem = profile["device"]["mem_bytes"] if args.mem is None else min(args.mem, profile["device"]["mem_bytes"])
    liveness = LivenessConfig() if args.heartbeat is None else LivenessConfig(interval_s=args.heartbeat)
    probe = ProbeConfig() if args.probe_interval is None else ProbeConfig(interval_s=args.probe_interval)
    config = PeerConfig(name=args.name, interfaces=interfaces_from(args), port=args.port,
                        data_port=args.data_port if args.data_port is not None else (args.port + 1 if args.port else 0),
                        seeds=tuple(args.peer),
                        mdns=args.mdns, threads=args.threads, mem_bytes=mem, model_dir=str(model_dir),
                        liveness=liveness, probe=probe)

    async def main() -> None:
        async with SwarmPeer(config, profile) as peer:
            print(json.dumps({"joined": peer.peer_id, "name": config.name, "address": peer.server.address,
                              "data_port": peer.server.data_port,
                              "mem_bytes": mem, "fingerprint": profile["model"]["fingerprint"]}), flush=True)
            task = asyncio.current_task()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):  # leave with an mDNS goodbye
                loop.add_signal_handler(sig, task.cancel)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(peer.run())
                    await asyncio.sleep(LONELY_S)
                    if not peer.directory.live:  # normal for the first peer; a hint for the others
                        print(f"no other peers yet after {LONELY_S:.0f} s (still listening):\n"
                              f"{peer.directory.diagnostic()}", file=sys.stderr, flush=True)
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

    try:
        asyncio.run(main())
    except asyncio.CancelledError:
        pass
    print("left the swarm", file=sys.stderr)
    return 0
