"""The torch thread owns the hosted stage: the loop reads only its published, frozen status."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import zmq

from swarm.model.sampling import GREEDY
from swarm.model.shard import Shard
from swarm.runtime import sockets
from swarm.runtime.wire import DEFAULT_LIMITS, Kind, Message, WireError, decode, encode
from swarm.runtime.worker import TorchWorker, WorkerStatus, drop_held_rows


@pytest.fixture
def worker():
    ctx = zmq.Context()
    w = TorchWorker(ctx, 1, DEFAULT_LIMITS)
    w.start("127.0.0.1", 0)
    yield w
    w.join()
    ctx.term()


async def test_a_load_is_one_job_and_the_status_is_a_new_frozen_snapshot(worker, tiny_model_dir):
    before = worker.status
    assert before == WorkerStatus() and before.dep is None
    loaded = await worker.load(5, lambda: Shard.load(tiny_model_dir, 2, 6, max_slots=2, max_len=16), None)
    after = worker.status
    assert loaded.weight_bytes > 0 and loaded.kv_bytes > 0 and loaded.load_s > 0
    assert (after.dep, after.start, after.end, after.max_slots) == (5, 2, 6, 2)
    assert after.jobs == before.jobs + 1  # drop the old stage, build, host: one round trip
    assert before.dep is None  # a snapshot already read never changes under its reader
    with pytest.raises(dataclasses.FrozenInstanceError):
        after.dep = 6  # type: ignore[misc]


async def test_a_failed_load_leaves_no_stage(worker, tiny_model_dir):
    await worker.load(1, lambda: Shard.load(tiny_model_dir, 0, 6, max_slots=1, max_len=8), None)

    def broken():
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        await worker.load(2, broken, None)
    assert worker.status.dep is None  # the old stage went before the new one was built
    with pytest.raises(WireError, match="no shard loaded"):
        await worker.open_slots(1, [0], GREEDY)


async def test_jobs_name_their_deployment(worker, tiny_model_dir):
    await worker.load(3, lambda: Shard.load(tiny_model_dir, 0, 6, max_slots=1, max_len=8), None)
    with pytest.raises(WireError, match="serves deployment 3, not 4"):
        await worker.open_slots(4, [0], GREEDY)
    assert not await worker.unload(dep=2)  # an old deployment's farewell keeps the newer stage
    assert worker.status.dep == 3
    assert await worker.unload(dep=3)
    assert worker.status.dep is None


async def test_steps_are_counted_in_the_published_status(worker, tiny_model_dir, tiny_reference):
    prompt = [5, 9, 2, 7]
    await worker.load(4, lambda: Shard.load(tiny_model_dir, 0, 6, max_slots=1, max_len=16), None)
    await worker.open_slots(4, [0], GREEDY)
    idle = worker.status
    ctx = zmq.Context()
    sock = sockets.connect_dealer(ctx, f"tcp://127.0.0.1:{worker.port}", b"src")
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    try:
        sock.send_multipart(encode(Message(Kind.STEP, {"dep": 4, "mb": 0, "step": 0, "slots": [0], "src": b"src"},
                                           (torch.tensor([prompt]),))))
        reply = decode(sock.recv_multipart())
    finally:
        sock.close(linger=0)
        ctx.term()
    assert reply.kind is Kind.TOKENS
    assert int(reply.tensors[0][0]) == tiny_reference([prompt], 1)[0][0]
    done = worker.status  # published before the reply was sent
    assert (done.steps, done.tokens, done.rows, done.received) == (1, 4, 1, 1)
    assert done.busy_s > 0 and done.queued == 0
    assert (idle.steps, idle.received) == (0, 0)


async def test_rehosting_keeps_the_shard_and_empties_its_slots(worker, tiny_model_dir):
    await worker.load(1, lambda: Shard.load(tiny_model_dir, 0, 6, max_slots=2, max_len=16), None, ("m", 0, 6))
    await worker.open_slots(1, [0, 1], GREEDY)
    kept = await worker.rehost(2, None)
    assert kept.kept and kept.load_s == 0.0 and kept.weight_bytes > 0
    status = worker.status
    assert (status.dep, status.weights, status.jobs) == (2, ("m", 0, 6), 3)
    with pytest.raises(WireError, match="serves deployment 2, not 1"):
        await worker.open_slots(1, [0], GREEDY)


def test_a_replay_drops_the_leading_rows_a_stage_already_holds():
    """Rows start at ``keep``; the stage computes from ``skip``: what lies before is dropped and
    the rows are right-padded again to the widest."""
    x = torch.arange(2 * 5 * 1, dtype=torch.float32).reshape(2, 5, 1)  # row 0: 5 real, row 1: 3 real
    out, lengths = drop_held_rows(x, [5, 3], keep=[10, 4], skip=[13, 4])
    assert out[:, :, 0].tolist() == [[3.0, 4.0, 0.0], [5.0, 6.0, 7.0]] and lengths == [2, 3]
    same, lengths = drop_held_rows(x, None, keep=[2, 2], skip=[2, 2])
    assert same is x and lengths is None
    with pytest.raises(WireError):  # a skip past every input row leaves nothing to compute
        drop_held_rows(x, [5, 3], keep=[10, 4], skip=[15, 4])
    with pytest.raises(WireError):
        drop_held_rows(x, [5, 3], keep=None, skip=[10, 4])
