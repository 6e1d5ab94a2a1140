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

Under a CPU quota below one CPU (a container, the testbed's devices) a hop is paid in CPU,
not in wall time: the device's step runs until its quota is spent, and whatever the hop
needs after it (the worker's encode and send, the I/O thread's write, the next receive)
waits for a later period. Every CPU millisecond of a hop then costs 1/share of wall time
on that device. Timed pings cannot show it (an idle device has its quota in hand), so
there the hop is the median CPU this process spends on a round trip (both ends, every thread:
the prober, the worker, zmq's I/O thread) divided by the share. A whole round trip, not
half: measured in the testbed's pipelines, a step's receive and send cost a stage 1.3-1.5 ms
of process CPU beyond its compute (its event loop's heartbeats included), where a ping
round trip costs 0.5-1.2 ms (a step carries an eight-field header and a tensor, is checked,
and publishes the worker's status; a ping carries neither).

    overhead_s = measure_hop_overhead("tcp://127.0.0.1:5555")    # a peer's own data socket
    overhead_s = measure_local_hop_overhead(threads=1)           # a source: a worker of its own
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from swarm.runtime import sockets
from swarm.runtime.wire import DEFAULT_LIMITS, Kind, Message, decode, encode

log = logging.getLogger(__name__)

# Timed round trips; the medians of their wall time and CPU are kept. Under a quota the CPU
# is divided by the share: with the mean of 15, the same 0.25-CPU board announced 4.97 ms in
# one testbed scenario and 2.13 ms in another, and the planner put a slower board in its place.
HOP_PROBES = 30
HOP_PROBE_GAP_S = 0.01  # sleep between them, as a stage waits between its steps
HOP_PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class CpuQuota:
    quota_s: float  # CPU time the cgroup may use per period
    period_s: float

    @property
    def cpus(self) -> float:
        return self.quota_s / self.period_s


def parse_cpu_max(text: str) -> CpuQuota | None:
    """cgroup v2 ``cpu.max`` ("50000 100000", or "max 100000" for none)."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    return CpuQuota(int(parts[0]) / 1e6, int(parts[1]) / 1e6)


def cpu_quota(proc_cgroup: str | None = None, root: Path = Path("/sys/fs/cgroup")) -> CpuQuota | None:
    """This process's CPU quota from its cgroup (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None
    without one or when it cannot be read."""
    try:
        text = Path("/proc/self/cgroup").read_text() if proc_cgroup is None else proc_cgroup
        for line in text.splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":  # v2
                found = parse_cpu_max((root / path.lstrip("/") / "cpu.max").read_text())
                if found is not None:
                    return found
            elif "cpu" in controllers.split(","):  # v1
                folder = root / "cpu" / path.lstrip("/")
                quota = int((folder / "cpu.cfs_quota_us").read_text())
                if quota > 0:
                    return CpuQuota(quota / 1e6, int((folder / "cpu.cfs_period_us").read_text()) / 1e6)
    except (OSError, ValueError):
        return None
    return None


def round_trips(address: str, rounds: int = HOP_PROBES, gap_s: float = HOP_PROBE_GAP_S,
                timeout_s: float = HOP_PROBE_TIMEOUT_S) -> tuple[list[float], list[float]]:
    """Blocking: PING round trips through the data socket at ``address`` (the first, which
    connects, untimed), each sent ``gap_s`` after the last reply. Returns, per round trip, its
    wall time and the CPU seconds this process (every thread) spent while it was in flight.
    Raises TimeoutError when the worker does not answer."""
    ctx = zmq.Context()
    sock = sockets.connect_dealer(ctx, address)
    try:
        times, cpus = [], []
        for i in range(rounds + 1):
            cpu_began, began = time.process_time(), time.perf_counter()
            sock.send_multipart(encode(Message(Kind.PING, {}, id=i + 1)), copy=False)
            if not sock.poll(int(timeout_s * 1000)):
                raise TimeoutError(f"no PONG from {address} within {timeout_s} s")
            reply = decode(sock.recv_multipart(copy=False), DEFAULT_LIMITS)
            if reply.kind is not Kind.PONG:
                raise RuntimeError(f"{address} answered {reply.kind.value} to a ping")
            if i:
                times.append(time.perf_counter() - began)
                cpus.append(time.process_time() - cpu_began)
            time.sleep(gap_s)
    finally:
        sock.close(linger=0)
        ctx.term()
    return times, cpus


def hop_overhead(idle_round_trip_s: float, cpu_per_round_trip_s: float, quota: CpuQuota | None) -> float:
    """A hop's cost from what the pings measured: half the idle round trip on a device with a
    CPU or more; under a smaller quota, the round trip's CPU at the quota's share (if more)."""
    if quota is None or quota.cpus >= 1:
        return idle_round_trip_s / 2
    return max(idle_round_trip_s / 2, cpu_per_round_trip_s / quota.cpus)


def measure_hop_overhead(address: str, rounds: int = HOP_PROBES, gap_s: float = HOP_PROBE_GAP_S,
                         timeout_s: float = HOP_PROBE_TIMEOUT_S, quota: CpuQuota | None = None) -> float:
    """Blocking: seconds a hop costs the torch worker whose data socket is at ``address``, in this
    process (``hop_overhead``; ``quota``: default this process's cgroup's). Under a quota, call it
    while nothing else in the process computes: their CPU would count as the hop's."""
    times, cpus = round_trips(address, rounds, gap_s, timeout_s)
    return hop_overhead(statistics.median(times), statistics.median(cpus), cpu_quota() if quota is None else quota)


def measure_local_hop_overhead(threads: int, rounds: int = HOP_PROBES, gap_s: float = HOP_PROBE_GAP_S,
                               quota: CpuQuota | None = None) -> float:
    """Blocking: the same figure for a process without a shard server (the source): a
    torch worker of its own on loopback, measured and stopped."""
    from swarm.runtime.worker import TorchWorker

    ctx = zmq.Context()
    worker = TorchWorker(ctx, threads, DEFAULT_LIMITS)
    try:
        worker.start("127.0.0.1", 0)
        return measure_hop_overhead(f"tcp://127.0.0.1:{worker.port}", rounds, gap_s, quota=quota)
    finally:
        worker.join()
        ctx.term()
