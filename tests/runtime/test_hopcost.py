"""A hop's fixed cost, measured through a real torch worker's data socket on loopback (issue 26)."""

from __future__ import annotations

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
        assert worker.counters.received == 7  # every ping went through the thread that runs steps
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
