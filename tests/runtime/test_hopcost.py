"""A hop's fixed cost, measured through a real torch worker's data socket on loopback (issue 26)."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from swarm.runtime import sockets
from swarm.runtime.hopcost import measure_hop_overhead, measure_local_hop_overhead
from swarm.runtime.wire import DEFAULT_LIMITS
from swarm.runtime.worker import TorchWorker


def test_the_overhead_is_half_a_ping_round_trip_through_the_worker_thread():
    ctx = zmq.Context()
    worker = TorchWorker(ctx, 1, DEFAULT_LIMITS)
    worker.start("127.0.0.1", 0)
    try:
        overhead = measure_hop_overhead(f"tcp://127.0.0.1:{worker.port}", rounds=6, gap_s=0.002)
        assert worker.status.received == 7  # every ping went through the thread that runs steps
        assert 0 < overhead < 0.5
    finally:
        worker.join()
        ctx.term()
    assert 0 < measure_local_hop_overhead(threads=1, rounds=3, gap_s=0.001) < 0.5


def test_a_data_socket_that_never_answers_times_out():
    ctx = zmq.Context()
    mute, address = sockets.bind_router(ctx, "127.0.0.1", 0)  # bound, never read
    try:
        with pytest.raises(TimeoutError, match="no PONG"):
            measure_hop_overhead(address, rounds=1, timeout_s=0.3)
    finally:
        mute.close(linger=0)
        ctx.term()


def test_cpu_quotas_are_read_from_cgroup_v2_and_v1(tmp_path):
    from swarm.runtime.hopcost import CpuQuota, cpu_quota, parse_cpu_max

    assert parse_cpu_max("max 100000\n") is None
    assert parse_cpu_max("40000 100000\n") == CpuQuota(0.04, 0.1)
    (tmp_path / "homenet-a").mkdir()
    (tmp_path / "homenet-a" / "cpu.max").write_text("2500 5000\n")
    assert cpu_quota("0::/homenet-a\n", tmp_path) == CpuQuota(0.0025, 0.005)
    (tmp_path / "cpu" / "homenet-b").mkdir(parents=True)
    (tmp_path / "cpu" / "homenet-b" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "homenet-b" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota("4:cpu,cpuacct:/homenet-b\n", tmp_path) is None
    (tmp_path / "cpu" / "homenet-b" / "cpu.cfs_quota_us").write_text("30000\n")
    assert cpu_quota("4:cpu,cpuacct:/homenet-b\n", tmp_path) == CpuQuota(0.03, 0.1)
    assert cpu_quota("0::/nowhere\n", tmp_path) is None


def test_under_a_quota_a_hop_costs_the_round_trips_cpu_at_the_share():
    from swarm.runtime.hopcost import CpuQuota, hop_overhead

    assert hop_overhead(0.001, 0.0008, None) == pytest.approx(0.0005)  # no quota: half the idle round trip
    assert hop_overhead(0.001, 0.0008, CpuQuota(0.002, 0.001)) == pytest.approx(0.0005)  # two CPUs
    assert hop_overhead(0.001, 0.0008, CpuQuota(0.001, 0.005)) == pytest.approx(0.004)  # a fifth of a CPU
    assert hop_overhead(0.012, 0.0008, CpuQuota(0.001, 0.005)) == pytest.approx(0.006)  # a slow wake-up is more


def test_the_round_trips_cpu_is_counted_on_every_thread():
    from swarm.runtime.hopcost import CpuQuota, round_trips
    from swarm.runtime.wire import Kind, Message, decode, encode

    ctx = zmq.Context()
    router, address = sockets.bind_router(ctx, "127.0.0.1", 0)
    answered = []  # ids of the pings answered

    def answer(n: int) -> None:  # a data socket that spends 2 ms of CPU on each ping
        for _ in range(n):
            if not router.poll(5000):  # the prober gave up: so does this thread
                return
            identity, *frames = router.recv_multipart()
            ping = decode(frames, DEFAULT_LIMITS)
            answered.append(ping.id)
            end = time.thread_time() + 0.002
            while time.thread_time() < end:
                pass
            router.send_multipart([identity, *encode(Message(Kind.PONG, {"status": {}}, re=ping.id))])

    server = threading.Thread(target=answer, args=(10,))
    server.start()
    try:
        times, cpus = round_trips(address, rounds=4, gap_s=0.001)
        # Under a tenth of a CPU, a round trip of 2 ms CPU or more is 20 ms or more of the device's time.
        overhead = measure_hop_overhead(address, rounds=4, gap_s=0.001, quota=CpuQuota(0.001, 0.01))
    finally:
        server.join()
        router.close(linger=0)
        ctx.term()
    assert len(answered) == 10 and len(times) == len(cpus) == 4
    assert all(0.002 <= cpu < 0.05 for cpu in cpus)  # this process's CPU per round trip: the answering thread's 2 ms included
    assert 0.02 <= overhead < 0.5
