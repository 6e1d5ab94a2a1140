"""Weights over the swarm: unit files fetched chunk by chunk over real encrypted loopback sockets.

A holder (``HolderServer``, as the source runs it) and a receiver (``fetch_units``, as a
peer runs it inside LOAD) in this process, with caches of their own: an interrupted
transfer resumes where it stopped, a flipped byte is caught and fetched again, the
receiver's memory stays bounded, and a stranger gets nothing. The end-to-end tests
start peer processes that never read the source's file (``--no-local-paths``).
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import psutil
import pytest
import torch
import zmq
from safetensors.torch import save_file

from swarm.aio import bounded
from swarm.model import hf
from swarm.model.local import LocalChain, generate
from swarm.model.shard import Shard
from swarm.model.store import weights_fingerprint
from swarm.model.unitfiles import file_sha256, holds_units, read_manifest, unit_path, units_dir
from swarm.runtime import sockets
from swarm.runtime.client import PeerClient
from swarm.runtime.deploy import StagePlacement as Stage
from swarm.runtime.engine import Pipeline, PipelineConfig
from swarm.runtime.holder import HolderServer, WeightsHolder
from swarm.localswarm import local_peers
from swarm.runtime.schedule import Layout
from swarm.runtime.transfer import TransferConfig, TransferError, fetch_units
from swarm.runtime.wire import Kind, Message
from tests.helpers.strangers import REPLY_WAIT_S, stranger_dealer

TINY_UNITS = 6
SMALL = TransferConfig(chunk_bytes=4096, window=2)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12]]
NEW = 10


class Interrupted(Exception):
    pass


def holder_for(model, tmp_path, quant=None) -> tuple[WeightsHolder, str]:
    fp = weights_fingerprint(model, quant)
    return WeightsHolder({fp: str(model)}, quant, root=tmp_path / "holder"), fp


async def test_an_interrupted_transfer_resumes_from_its_part_file(tiny_model_dir, tmp_path):
    holder, fp = holder_for(tiny_model_dir, tmp_path)
    recv = tmp_path / "receiver"

    def interrupt(progress):
        if progress.fetched_bytes >= 3 * SMALL.chunk_bytes:
            raise Interrupted

    async with HolderServer(holder) as server, PeerClient(server.address) as client:
        with pytest.raises(Interrupted):
            await fetch_units(client, fp, "float32", None, range(TINY_UNITS), root=recv, config=SMALL,
                              on_progress=interrupt)
        folder = units_dir(fp, "float32", recv)
        part = unit_path(folder, 0).with_name("unit-000.bin.part")
        assert part.stat().st_size == 3 * SMALL.chunk_bytes  # three chunks landed, in order
        assert not holds_units(folder, range(TINY_UNITS))
        sent_before, seen = holder.sent_bytes, []
        assert await fetch_units(client, fp, "float32", None, range(TINY_UNITS), root=recv, config=SMALL,
                                 on_progress=seen.append) == folder
    manifest = read_manifest(folder)
    total = sum(manifest["units"][str(u)]["size"] for u in range(TINY_UNITS))
    # resumed, not restarted: only what the .part lacked crossed the wire (plus, at most, the
    # chunks asked for before the interruption and answered after it: window - 1 of them)
    resumed = total - 3 * SMALL.chunk_bytes
    assert resumed <= holder.sent_bytes - sent_before <= resumed + (SMALL.window - 1) * SMALL.chunk_bytes
    assert seen[-1].fetched_bytes == total - 3 * SMALL.chunk_bytes and seen[-1].done_bytes == total
    held = units_dir(fp, "float32", tmp_path / "holder")
    for unit in range(TINY_UNITS):
        assert unit_path(folder, unit).read_bytes() == unit_path(held, unit).read_bytes()
        assert file_sha256(unit_path(folder, unit)) == manifest["units"][str(unit)]["sha256"]
    ids = torch.tensor([[5, 9, 33, 2]])
    assert torch.equal(Shard.load(folder, 0, TINY_UNITS).step([0], ids), Shard.load(tiny_model_dir, 0, TINY_UNITS).step([0], ids))


async def test_a_flipped_byte_in_the_holders_file_is_caught_and_fetched_again(tiny_model_dir, tmp_path):
    holder, fp = holder_for(tiny_model_dir, tmp_path)
    async with HolderServer(holder) as server, PeerClient(server.address) as client:
        first = await fetch_units(client, fp, "float32", None, range(1, 2), root=tmp_path / "a", config=SMALL)
        good = unit_path(first, 1).read_bytes()
        held_file = unit_path(units_dir(fp, "float32", tmp_path / "holder"), 1)

        def flip() -> None:
            data = bytearray(held_file.read_bytes())
            data[len(data) // 2] ^= 0x10
            held_file.write_bytes(bytes(data))

        flip()  # one attempt only: the mismatch is reported, and the .part is gone
        with pytest.raises(TransferError, match="did not match its sha256"):
            await fetch_units(client, fp, "float32", None, range(1, 2), root=tmp_path / "b",
                              config=TransferConfig(chunk_bytes=4096, window=2, attempts=1))
        assert not list(units_dir(fp, "float32", tmp_path / "b").glob("unit-001.bin*"))
        flip()
        before = holder.sent_bytes
        again = await fetch_units(client, fp, "float32", None, range(1, 2), root=tmp_path / "c", config=SMALL)
    assert unit_path(again, 1).read_bytes() == good
    assert holder.sent_bytes - before == 2 * len(good)  # the bad copy, then the holder's rewritten file


async def test_the_receivers_memory_stays_bounded_while_a_large_unit_arrives(tmp_path):
    """A 268 MB embedding unit moves in 1 MiB chunks, 4 outstanding: the peak resident size
    (holder and receiver both in this process) grows by a small fraction of it (about 35 MB:
    the window, zmq's buffers, and freed buffers between two trims)."""
    model = write_wide_model(tmp_path / "wide", vocab=65536)
    unit_bytes = 65536 * 1024 * 4
    holder, fp = holder_for(model, tmp_path)
    cfg = TransferConfig()  # the defaults: 1 MiB chunks, 4 outstanding
    async with HolderServer(holder) as server, PeerClient(server.address) as client:
        reply = await client.request(Kind.UNIT, {"fp": fp, "dtype": "float32", "quant": None, "unit": 0}, timeout=120)
        assert reply["size"] > unit_bytes  # the holder wrote its file first (that read is not the receiver's)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident size starts again from now
        base = psutil.Process().memory_info().rss
        folder = await bounded(fetch_units(client, fp, "float32", None, range(0, 1), root=tmp_path / "r", config=cfg), 300)
    peak = _peak_rss()
    assert unit_path(folder, 0).stat().st_size == reply["size"]
    assert peak - base < unit_bytes / 4, f"peak grew by {(peak - base) / 1e6:.0f} MB for a {unit_bytes / 1e6:.0f} MB unit"


def write_wide_model(folder, vocab: int, hidden: int = 1024):
    """A one-layer Llama whose embedding (and tied head) is vocab x hidden float32: big units, fast to write."""
    folder.mkdir()
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab, hidden_size=hidden,
                  intermediate_size=64, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8,
                  max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True, torch_dtype="float32")
    (folder / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * 0.02,
               "model.norm.weight": torch.ones(hidden)}
    for name, shape in [("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden, hidden)),
                        ("self_attn.v_proj", (hidden, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                        ("mlp.gate_proj", (64, hidden)), ("mlp.up_proj", (64, hidden)), ("mlp.down_proj", (hidden, 64))]:
        tensors[f"model.layers.0.{name}.weight"] = torch.randn(*shape, generator=g) * 0.02
    for name in ("input_layernorm", "post_attention_layernorm"):
        tensors[f"model.layers.0.{name}.weight"] = torch.ones(hidden)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def _peak_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def test_a_stranger_gets_no_weights(tiny_model_dir, tmp_path):
    holder, fp = holder_for(tiny_model_dir, tmp_path)
    held = {"fp": fp, "dtype": "float32", "quant": None}
    requests = [Message(Kind.MANIFEST, held, id=1), Message(Kind.UNIT, {**held, "unit": 1}, id=2),
                Message(Kind.FETCH, {**held, "unit": 1, "offset": 0, "length": 4096}, id=3)]
    async with HolderServer(holder) as server:
        ctx = zmq.Context()
        socks = [stranger_dealer(ctx, server.address, how, sockets.current_keys())
                 for how in ("plain", "other-swarm", "own-client-key")]
        try:
            for sock in socks:
                for message in requests:
                    try:
                        from swarm.runtime.wire import encode

                        sock.send_multipart(encode(message), flags=zmq.NOBLOCK)
                    except zmq.Again:
                        pass
            deadline, replies = time.monotonic() + REPLY_WAIT_S, 0
            while time.monotonic() < deadline:
                replies += sum(1 for s in socks if s.poll(50) and s.recv_multipart())
        finally:
            for sock in socks:
                sock.close()
            ctx.term()
        assert replies == 0
        assert holder.sent_bytes == 0
        assert not units_dir(fp, "float32", tmp_path / "holder").exists()  # not even a manifest was written
        async with PeerClient(server.address) as member:  # while a member is answered
            assert (await member.request(Kind.UNIT, {**held, "unit": 1}))["size"] > 0


# ---------------------------------------------------------------- a pipeline whose peers hold no weights

@pytest.fixture(scope="module")
def gguf_model(tiny_model_dir, tmp_path_factory):
    from tests.helpers.gguf import write_gguf

    return write_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny-Q4_0.gguf", "Q4_0")


@pytest.mark.slow
@pytest.mark.parametrize("source,quant", [("hf", None), ("gguf", "int4")])
async def test_peers_without_the_model_fetch_their_units_and_answer_exactly(tiny_model_dir, gguf_model, tmp_path,
                                                                            source, quant):
    model = tiny_model_dir if source == "hf" else gguf_model
    want = generate(LocalChain.load(model, [(0, TINY_UNITS)], max_slots=2, max_len=64, quant=quant), PROMPTS, NEW)
    cache = tmp_path / "peer-cache"
    with local_peers(2, args=["--no-local-paths"], env={"SWARM_CACHE_DIR": str(cache)}) as peers:
        plan = (Stage(None, 0, 2), Stage(peers[0], 2, 4), Stage(peers[1], 4, TINY_UNITS))
        config = PipelineConfig(model, plan, layout=Layout(1, 2), max_len=64, quant=quant)
        async with Pipeline(config) as pipe:
            got = await bounded(pipe.generate_all(PROMPTS, NEW), 60)
            transfers = dict(pipe.deployment.transfers)
            sizes = [r.weight_bytes for r in pipe.deployment.ready[1:]]
        async with PeerClient(peers[0]) as peer:  # the units are cached: a LOAD again moves nothing
            status = await peer.ping()
    assert got == want
    fp = weights_fingerprint(model, quant)
    folder = units_dir(fp, "float32" if quant is None else f"float32-{quant}", cache)
    assert holds_units(folder, range(2, TINY_UNITS)) and not holds_units(folder, range(0, 1))
    assert set(transfers) == set(peers)  # the source heard each peer's progress
    assert all(t["done"] == t["total"] > 0 for t in transfers.values())
    assert all(s > 0 for s in sizes) and status["transfer"] is None


@pytest.mark.slow
async def test_a_peer_without_the_model_and_without_a_holder_says_so(tiny_model_dir, tmp_path):
    with local_peers(1, args=["--no-local-paths"], env={"SWARM_CACHE_DIR": str(tmp_path / "c")}) as peers:
        async with PeerClient(peers[0]) as peer:
            with pytest.raises(Exception, match="names no holder"):
                await peer.load(tmp_path / "not-here.gguf", 2, 4, slots=1, max_len=16,
                                fingerprint=weights_fingerprint(tiny_model_dir))


def test_progress_reads_bytes_rate_and_time_left():
    from swarm.cli.top import transfer_note
    from swarm.runtime.transfer import Progress, describe

    p = Progress(total_bytes=40_000_000, done_bytes=12_000_000, fetched_bytes=8_000_000, started=100.0)
    assert p.rate_bps(now=101.0) == 8e6 and p.eta_s(now=101.0) == 3.5
    assert describe(12_000_000, 40_000_000, 8e6) == "12.0 MB / 40.0 MB at 8.0 MB/s, 4 s left"
    assert describe(0, 40_000_000, 0.0) == "0.0 MB / 40.0 MB"  # nothing moved yet: no rate to promise
    assert transfer_note("local-1", {"done": 12_000_000, "total": 40_000_000, "rate_bps": 8e6}) == \
        "local-1 receiving weights: 12.0 MB / 40.0 MB at 8.0 MB/s, 4 s left"


@pytest.mark.parametrize("case,want", [
    (dict(own=True, cached=True, path_exists=True, local_paths=True, holder="h", models=["fp1"]), "own"),
    (dict(own=False, cached=True, path_exists=True, local_paths=True, holder="h", models=[]), "cache"),
    (dict(own=False, cached=False, path_exists=True, local_paths=True, holder="h", models=[]), "path"),
    (dict(own=False, cached=False, path_exists=True, local_paths=False, holder="h", models=[]), "holder"),
    (dict(own=False, cached=False, path_exists=True, local_paths=False, holder=None, models=[]), "path"),
    (dict(own=False, cached=False, path_exists=True, local_paths=True, holder="h", models=["other"]), "path"),
    (dict(own=False, cached=False, path_exists=True, local_paths=False, holder="h", models=["other"]), "holder"),
    (dict(own=False, cached=False, path_exists=False, local_paths=True, holder="h", models=[]), "holder"),
    (dict(own=False, cached=False, path_exists=False, local_paths=True, holder=None, models=["other"]), "holds model"),
    (dict(own=False, cached=False, path_exists=True, local_paths=True, holder=None, models=["other"]), "holds model"),
    (dict(own=False, cached=False, path_exists=False, local_paths=True, holder=None, models=[]), "names no holder"),
])
def test_where_a_loads_weights_come_from(case, want):
    from swarm.runtime.loadweights import weights_from
    from swarm.runtime.wire import WireError

    if want in ("own", "cache", "path", "holder"):
        assert weights_from("ab12", path="/m.gguf", **case).value == want
    else:
        with pytest.raises(WireError, match=want):
            weights_from("ab12", path="/m.gguf", **case)


@pytest.mark.slow
async def test_a_peer_killed_while_receiving_resumes_after_a_restart(tmp_path):
    """A real peer process is SIGKILLed mid-transfer; a new one on the same cache asks only for the rest."""
    import signal

    model = write_wide_model(tmp_path / "wide", vocab=32768)  # the tied head's unit: 134 MB
    holder, fp = holder_for(model, tmp_path)
    env = {"SWARM_CACHE_DIR": str(tmp_path / "peer-cache")}
    folder = units_dir(fp, "float32", tmp_path / "peer-cache")
    async with HolderServer(holder) as server:
        async with PeerClient(server.address) as member:  # the holder writes its files before the clock
            for unit in (1, 2):
                await member.request(Kind.UNIT, {"fp": fp, "dtype": "float32", "quant": None, "unit": unit}, timeout=120)
        total = sum(read_manifest(units_dir(fp, "float32", tmp_path / "holder"))["units"][str(u)]["size"] for u in (1, 2))
        with local_peers(1, args=["--no-local-paths"], env=env) as (address,):
            async with PeerClient(address) as peer:
                loading = asyncio.create_task(peer.load(model, 1, 3, slots=1, max_len=8, fingerprint=fp,
                                                        holder=server.address))
                try:
                    while ((await peer.ping()).get("transfer") or {}).get("done", 0) < 40e6:
                        assert not loading.done(), "the transfer ended before it could be interrupted"
                        await asyncio.sleep(0.02)
                    os.kill(_pid_of(address), signal.SIGKILL)
                finally:
                    loading.cancel()  # a killed peer never answers
                    await asyncio.gather(loading, return_exceptions=True)
        kept = sum(p.stat().st_size for p in folder.glob("*.part")) + sum(
            p.stat().st_size for p in folder.glob("unit-*.bin"))
        assert 0 < kept < total
        sent_before = -1
        while sent_before != holder.sent_bytes:  # chunks asked for before the kill may still be answered
            sent_before = holder.sent_bytes
            await asyncio.sleep(0.3)
        with local_peers(1, args=["--no-local-paths"], env=env) as (address,):
            async with PeerClient(address) as peer:
                ready = await peer.load(model, 1, 3, slots=1, max_len=8, fingerprint=fp, holder=server.address)
    assert ready.weight_bytes > 0
    assert holder.sent_bytes - sent_before == total - kept  # resumed, not restarted
    assert holds_units(folder, range(1, 3))


def _pid_of(address: str) -> int:
    port = sockets.port_of(address)
    return next(c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.status == "LISTEN")


async def test_the_holder_bounds_each_clients_requests_in_flight(tiny_model_dir, tmp_path):
    import dataclasses

    from swarm.runtime.wire import DEFAULT_LIMITS

    holder, fp = holder_for(tiny_model_dir, tmp_path)
    fields = {"fp": fp, "dtype": "float32", "quant": None}
    limits = dataclasses.replace(DEFAULT_LIMITS, max_requests_per_client=2)
    async with HolderServer(holder, limits=limits) as server, PeerClient(server.address) as flood, \
            PeerClient(server.address) as calm:
        results = await asyncio.gather(*(flood.request(Kind.UNIT, {**fields, "unit": u}) for u in range(6)),
                                       return_exceptions=True)
        refused = [r for r in results if isinstance(r, Exception)]
        assert refused and all("too many requests in flight from this client (limit 2)" in str(r) for r in refused)
        assert sum(not isinstance(r, Exception) for r in results) >= 2
        assert (await calm.request(Kind.MANIFEST, fields))["manifest"]["fingerprint"] == fp
