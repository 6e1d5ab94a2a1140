"""`swarm join`: profile this device for the model (cached), serve shards, announce it.

Without --model the peer offers its memory for any model: a source of another model
plans with its measured speed scaled to that model, and the units the plan gives it
travel from the source (``swarm.runtime.transfer``) into its cache."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import sys
from pathlib import Path

from swarm.cli.common import add_secret_arguments, use_swarm_secret
from swarm.cli.options import (add_memory_option, add_model_option, add_network_options, add_quant_option,
                              add_threads_option, interfaces_from)

LONELY_S = 10.0  # after this long alone, say what discovery tried and heard
LEAVE_TIMEOUT_S = 10.0  # on Ctrl-C / SIGTERM: longest wait for the source to move our stages away


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("join", help="profile this device, serve shards and announce it",
                              description=__doc__.split("\n\n")[0])
    add_model_option(p)
    p.add_argument("--name", default=socket.gethostname(), help="name shown to other peers")
    add_memory_option(p)
    add_threads_option(p, who="this peer")
    add_quant_option(p)
    add_network_options(p)
    p.add_argument("--port", type=int, default=0, help="shard server (control) port (default: any free port)")
    p.add_argument("--data-port", type=int,
                   help="port pipeline steps arrive on (default: --port + 1 when --port is given, else any free port)")
    p.add_argument("--profile", type=Path, help="use this measured profile JSON instead of profiling")
    p.add_argument("--local-paths", action="store_true",
                   help="read a source's model in place when its path exists on this machine (a peer beside "
                        "its source); by default the weights of a model this peer does not hold come over "
                        "the swarm into its cache, as on any other device")
    p.add_argument("--heartbeat", type=float, help="seconds between heartbeats (default 1.0)")
    p.add_argument("--probe-interval", type=float, help="seconds between link measurements (default 30)")
    p.add_argument("--hop-overhead", type=float, metavar="S",
                   help="use this per-hop cost in seconds (wake-up, decode, encode of a step) instead of "
                        "measuring it, as --profile does for the per-unit times")
    p.add_argument("--leave-timeout", type=float, default=LEAVE_TIMEOUT_S, metavar="S",
                   help="on Ctrl-C or SIGTERM, wait at most this long for the source to move this peer's "
                        "stages away, so an answer in progress goes on (default: %(default)s; a second "
                        "Ctrl-C leaves at once)")
    add_secret_arguments(p)
    p.set_defaults(func=run)
    return p


def load_profile(args, model_dir) -> dict:
    if args.profile:
        return json.loads(args.profile.read_text())
    from swarm.discovery.peer import measure_profile

    return measure_profile(model_dir, args.threads, args.mem, args.quant)


def run(args) -> int:
    import torch

    use_swarm_secret(args, store=True)
    torch.set_num_threads(args.threads)
    from swarm.discovery.links import ProbeConfig
    from swarm.discovery.liveness import LivenessConfig
    from swarm.discovery.peer import PeerConfig, SwarmPeer

    from rich.console import Console

    from swarm.cli.common import resolve_model_or_exit

    # Without --model this peer offers its memory for any model: it profiles (and holds) the
    # default model, and fetches the units of any other that a plan gives it from the source.
    open_peer = args.model is None
    model_dir = resolve_model_or_exit(args.model, Console(stderr=True))
    profile = load_profile(args, model_dir)
    if args.profile and args.quant != profile["model"].get("quant"):
        raise SystemExit(f"error: --quant {args.quant} but the profile {args.profile} was measured with "
                         f"{profile['model'].get('quant') or 'no'} quantization")
    mem = profile["device"]["mem_bytes"] if args.mem is None else min(args.mem, profile["device"]["mem_bytes"])
    liveness = LivenessConfig() if args.heartbeat is None else LivenessConfig(interval_s=args.heartbeat)
    probe = ProbeConfig() if args.probe_interval is None else ProbeConfig(interval_s=args.probe_interval)
    config = PeerConfig(name=args.name, interfaces=interfaces_from(args), port=args.port,
                        data_port=args.data_port if args.data_port is not None else (args.port + 1 if args.port else 0),
                        seeds=tuple(args.peer),
                        mdns=args.mdns, threads=args.threads, mem_bytes=mem, model_dir=str(model_dir),
                        quant=profile["model"].get("quant"), open=open_peer, local_paths=args.local_paths,
                        hop_overhead_s=args.hop_overhead, liveness=liveness, probe=probe)
    # Weights on their way here are logged (bytes, rate, time left) whatever the verbosity,
    # and so are the LOADs they are for.
    for name in ("swarm.runtime.server", "swarm.runtime.loadweights"):
        logging.getLogger(name).setLevel(logging.INFO)

    async def main() -> None:
        async with SwarmPeer(config, profile) as peer:
            print(json.dumps({"joined": peer.peer_id, "name": config.name, "address": peer.server.address,
                              "data_port": peer.server.data_port,
                              "mem_bytes": mem, "fingerprint": profile["model"]["fingerprint"],
                              "any_model": open_peer}), flush=True)
            task = asyncio.current_task()
            loop = asyncio.get_running_loop()
            leave = asyncio.Event()

            def on_signal() -> None:  # the first asks to leave gracefully, a second leaves at once
                if leave.is_set():
                    task.cancel()
                leave.set()

            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, on_signal)
            # SIGHUP (the terminal closed, or the parent of a local peer died): at once.
            loop.add_signal_handler(signal.SIGHUP, task.cancel)
            try:
                async with asyncio.TaskGroup() as tg:
                    serving = tg.create_task(peer.run())
                    hint = tg.create_task(_hint_if_alone(peer))
                    await leave.wait()
                    hint.cancel()
                    await _leave(peer, args.leave_timeout)
                    serving.cancel()
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    loop.remove_signal_handler(sig)

    try:
        asyncio.run(main())
    except asyncio.CancelledError:
        pass
    print("left the swarm", file=sys.stderr)
    return 0


async def _hint_if_alone(peer) -> None:
    await asyncio.sleep(LONELY_S)
    if not peer.directory.live:  # normal for the first peer; a hint for the others
        print(f"no other peers yet after {LONELY_S:.0f} s (still listening):\n{peer.directory.diagnostic()}",
              file=sys.stderr, flush=True)


async def _leave(peer, timeout_s: float) -> None:
    holds = peer.server.status()["state"] == "loaded"
    if holds:
        print(f"leaving: waiting up to {timeout_s:.0f} s for the source to move this peer's stages away "
              "(Ctrl-C again to leave at once)", file=sys.stderr, flush=True)
    moved = await peer.leave(timeout_s)
    if holds:
        print("stages moved away" if moved else f"the source did not move the stages within {timeout_s:.0f} s",
              file=sys.stderr, flush=True)

