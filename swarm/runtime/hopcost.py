"""What a hop costs a device besides bytes over bandwidth (issue 26), measured on its data path.

A pipeline step reaches a peer's torch thread (``swarm.runtime.worker``) as a message on
its data socket: the thread wakes up, decodes it, computes, encodes the result and sends
it on. The data socket answers PING on that same thread, the same way, without compute.
So the round trip of a PING sent from another thread of this machine over loopback is
two hops' worth of that fixed cost (our send and the worker's wake-up and decode, the
worker's encode and send and our wake-up), and one hop, which a stage pays once per
step (it receives one message and sends one), is half of it. The pings are spaced so the
worker's thread sleeps between them as it does between pipeline steps: waking a sleeping
thread (on a busy or CPU-throttled device, a wait for the scheduler) is most of the cost.

    overhead_s = measure_hop_overhead("tcp://127.0.0.1:5555")    # a peer's own data socket
    overhead_s = measure_local_hop_overhead(threads=1)           # a source: a worker of its own
"""

from __future__ import annotations

import logging
import statistics
import time

import zmq

from swarm.runtime import sockets
from swarm.runtime.wire import DEFAULT_LIMITS, Kind, Message, decode, encode

log = logging.getLogger(__name__)

HOP_PROBES = 15  # timed round trips; the median is kept
HOP_PROBE_GAP_S = 0.01  # sleep between them, as a stage waits between its steps
HOP_PROBE_TIMEOUT_S = 5.0


def measure_hop_overhead(address: str, rounds: int = HOP_PROBES, gap_s: float = HOP_PROBE_GAP_S,
                         timeout_s: float = HOP_PROBE_TIMEOUT_S) -> float:
    """Blocking: seconds a hop costs the torch worker whose data socket is at ``address``
    (half the median PING round trip from this thread; the first, which connects, untimed).
    Raises TimeoutError when the worker does not answer."""
    ctx = zmq.Context()
    sock = sockets.connect_dealer(ctx, address)
    try:
        times = []
        for i in range(rounds + 1):
            began = time.perf_counter()
            sock.send_multipart(encode(Message(Kind.PING, {}, id=i + 1)), copy=False)
            if not sock.poll(int(timeout_s * 1000)):
                raise TimeoutError(f"no PONG from {address} within {timeout_s} s")
            reply = decode(sock.recv_multipart(copy=False), DEFAULT_LIMITS)
            if reply.kind is not Kind.PONG:
                raise RuntimeError(f"{address} answered {reply.kind.value} to a ping")
            if i:
                times.append(time.perf_counter() - began)
            time.sleep(gap_s)
    finally:
        sock.close(linger=0)
        ctx.term()
    return statistics.median(times) / 2


def measure_local_hop_overhead(threads: int, rounds: int = HOP_PROBES, gap_s: float = HOP_PROBE_GAP_S) -> float:
    """Blocking: the same figure for a process without a shard server (the source): a
    torch worker of its own on loopback, measured and stopped."""
    from swarm.runtime.worker import TorchWorker

    ctx = zmq.Context()
    worker = TorchWorker(ctx, threads, DEFAULT_LIMITS)
    try:
        worker.start("127.0.0.1", 0)
        return measure_hop_overhead(f"tcp://127.0.0.1:{worker.port}", rounds, gap_s)
    finally:
        worker.join()
        ctx.term()
