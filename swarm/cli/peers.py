"""`swarm peers`: who is in the swarm, with what they announced."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from swarm.cli.common import add_secret_arguments, use_swarm_secret
from swarm.cli.options import add_network_options, interfaces_from

LISTEN_S = 3.0  # mDNS answers arrive within about 1.2 s; then one heartbeat round


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("peers", help="list the peers announced on the network",
                              description=__doc__.splitlines()[0])
    add_network_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_secret_arguments(p)
    p.add_argument("--wait", type=float, default=LISTEN_S, help=f"seconds to listen (default {LISTEN_S})")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from swarm.discovery.directory import Directory, DirectoryConfig

    use_swarm_secret(args)

    async def gather() -> tuple[dict, str]:
        async with Directory(DirectoryConfig(interfaces=interfaces_from(args), seeds=tuple(args.peer),
                                                     mdns=args.mdns)) as d:
            async with asyncio.TaskGroup() as tg:
                task = tg.create_task(d.run())
                await asyncio.sleep(args.wait)  # listening window, not a synchronisation
                task.cancel()
            return dict(d.live), d.diagnostic()

    live, diagnostic = asyncio.run(gather())
    peers = [peer_json(r) for r in sorted(live.values(), key=lambda r: r.announcement.name)]
    if args.json:
        print(json.dumps({"peers": peers}, indent=2))
    else:
        print_table(peers)
    if not peers:
        print(diagnostic, file=sys.stderr)
        return 1
    return 0


def peer_json(rec) -> dict:
    a = rec.announcement
    return {"id": a.peer_id, "name": a.name, "host": rec.host, "port": rec.port, "fingerprint": a.fingerprint,
            "mem_bytes": a.mem_bytes, "threads": a.threads, "kind": a.kind, "num_units": a.num_units,
            "prefill_us": list(a.prefill_us), "decode_us": list(a.decode_us), "summarised": a.summarised,
            "unit_times_s": a.unit_times(), "seq": a.seq,
            "step_overhead_us": a.step_overhead_us, "hop_overhead_us": a.hop_overhead_us,
            "links": {pid: {"bandwidth_Bps": l.bandwidth, "rtt_s": l.rtt} for pid, l in sorted(a.links.items())}}


def print_table(peers: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    names = {p["id"]: p["name"] for p in peers}
    table = Table(title=f"{len(peers)} peer(s)")
    for col in ("name", "address", "model", "memory", "decode ms", "prefill ms", "links: MB/s @ rtt ms"):
        table.add_column(col, no_wrap=col != "links: MB/s @ rtt ms")
    for p in peers:
        decode_ms, prefill_ms = (sum(p[k]) / 1e3 if not p["summarised"] else float("nan")
                                 for k in ("decode_us", "prefill_us"))
        links = "\n".join(f"{names.get(pid, pid)}: {l['bandwidth_Bps'] / 1e6:.0f} @ {l['rtt_s'] * 1e3:.2f}"
                           for pid, l in p["links"].items())
        table.add_row(f"{p['name']} ({p['id'][:6]})", f"{p['host']}:{p['port']}", p["fingerprint"][:8],
                      f"{p['mem_bytes'] / 2**30:.2f} GiB", f"{decode_ms:.1f}", f"{prefill_ms:.1f}", links or "-")
    Console().print(table)
