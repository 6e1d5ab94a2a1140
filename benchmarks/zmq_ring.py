"""The floor under `swarm bench`'s per-hop figure: what a hop costs on this machine with no swarm code at all.

K processes in a ring on 127.0.0.1, the shape of a sequential pipeline (source + 3
peers): each works for a stage's time, streaming through 128 MB of its own memory as
a shard streams its weights (so caches are as cold as a real stage leaves them), then
sends a decode step's hidden state (2,304 bytes, SmolLM2's) to the next over a
blocking pyzmq DEALER -> ROUTER, and waits for the next one. Nothing else: no msgpack, no torch, no event loop, no
threads of ours. The time per round beyond K x the compute time, divided by K, is
what the operating system and libzmq alone charge per hop: waking the receiving
process and zmq's I/O threads (each process has its own) on a core that was idle.

    python benchmarks/zmq_ring.py [--json] [--processes 4] [--compute-ms 16] [--stream-mb 128]
                                  [--rounds 150] [--repeats 5]

--stream-mb 0 spins instead (caches stay warm); --compute-ms 0 is the hot case: the
ring never waits long enough for a core to idle.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time

import numpy as np
import zmq

PAYLOAD = bytes(2304)  # one token's hidden state, SmolLM2-135M float32


CHUNK = 1 << 20  # float32 values read between clock checks (4 MB)


def work(seconds: float, memory: np.ndarray | None) -> None:
    """Busy for ``seconds`` (a sleep would let the core idle, which is not what a stage does),
    reading ``memory`` chunk after chunk, round and round, when given."""
    end = time.perf_counter() + seconds
    at = 0
    while time.perf_counter() < end:
        if memory is not None:
            memory[at:at + CHUNK].sum()
            at = (at + CHUNK) % memory.size


def stage(index: int, ports: list[int], compute_s: float, stream_mb: int, rounds: int, results) -> None:
    memory = np.ones(stream_mb * (1 << 20) // 4, dtype=np.float32) if stream_mb else None
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.ROUTER)
    inbox.bind(f"tcp://127.0.0.1:{ports[index]}")
    outbox = ctx.socket(zmq.DEALER)
    outbox.connect(f"tcp://127.0.0.1:{ports[(index + 1) % len(ports)]}")
    if index == 0:
        for _ in range(20):  # connections up and warm
            outbox.send(PAYLOAD)
            inbox.recv_multipart()
        began = time.perf_counter()
        for _ in range(rounds):
            work(compute_s, memory)
            outbox.send(PAYLOAD)
            inbox.recv_multipart()
        results.put((time.perf_counter() - began) / rounds)
        outbox.send(b"")  # the stop token goes round once
        inbox.recv_multipart()
    else:
        while True:
            _, body = inbox.recv_multipart()
            if body:
                work(compute_s, memory)
            outbox.send(body)
            if not body:
                break
    inbox.close(linger=0)
    outbox.close(linger=0)
    ctx.term()


def free_ports(count: int) -> list[int]:
    ctx = zmq.Context()
    socks = [ctx.socket(zmq.ROUTER) for _ in range(count)]
    ports = [s.bind_to_random_port("tcp://127.0.0.1") for s in socks]
    for s in socks:
        s.close(linger=0)
    ctx.term()
    return ports


def ring_round_s(processes: int, compute_s: float, stream_mb: int, rounds: int) -> float:
    results = mp.get_context("spawn").Queue()
    ports = free_ports(processes)
    ctx = mp.get_context("spawn")
    others = [ctx.Process(target=stage, args=(i, ports, compute_s, stream_mb, rounds, results)) for i in range(1, processes)]
    for p in others:
        p.start()
    first = ctx.Process(target=stage, args=(0, ports, compute_s, stream_mb, rounds, results))
    first.start()
    round_s = results.get(timeout=600)
    for p in [first, *others]:
        p.join(30)
    return round_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--compute-ms", type=float, default=16.0, help="busy time per stage per round")
    parser.add_argument("--stream-mb", type=int, default=128, help="memory each stage reads while busy (0: spin)")
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    compute_s = args.compute_ms / 1e3
    per_hop = []
    for _ in range(args.repeats):
        round_s = ring_round_s(args.processes, compute_s, args.stream_mb, args.rounds)
        per_hop.append((round_s - args.processes * compute_s) / args.processes)
        if not args.json:
            print(f"round {round_s * 1e3:.2f} ms: {per_hop[-1] * 1e3:.3f} ms per hop", file=sys.stderr)
    result = {"processes": args.processes, "compute_ms": args.compute_ms, "stream_mb": args.stream_mb,
              "rounds": args.rounds,
              "hop_ms_median": statistics.median(per_hop) * 1e3, "hop_ms": [h * 1e3 for h in per_hop]}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.processes} processes, {args.compute_ms} ms work each ({args.stream_mb} MB streamed): "
              f"{result['hop_ms_median']:.3f} ms per hop (median of {args.repeats})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
