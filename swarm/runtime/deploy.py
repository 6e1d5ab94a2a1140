"""A deployment: a plan's stages loaded, the first in this process, the rest on peers.

    plan = (StagePlacement(None, 0, 11), StagePlacement("tcp://10.0.0.2:5555", 11, 22),
            StagePlacement("tcp://10.0.0.3:5555", 22, 32))
    async with Deployment(model_dir, plan, slots=8, max_len=256, on_message=handler) as dep:
        dep.ready          # per stage: load time, weight/KV/process memory
        await dep.open_slots([3], GREEDY)
        out, compute_s = await dep.submit_first_stage(mb, step, slots, tokens, lengths)   # hidden sent on to stage 1

Each peer loads its own unit range from its own copy of the model, or from its unit
cache, or from unit files it fetches from this source (which serves them on a
weights socket of its own while the deployment lives, ``runtime.holder``), and is
told where to forward its results (the next stage's data socket). The source holds unit
0, so raw token ids never leave this process; only hidden states do. Its torch
thread sends them to stage 1's data socket; token ids (and any step's error) come
home over the source's connection to each peer's data socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Sequence

import psutil
import torch
import zmq

from swarm.model.sampling import GREEDY, SamplingParams
from swarm.model.shard import Shard
from swarm.model.store import weights_fingerprint
from swarm.runtime import sockets
from swarm.runtime.client import PeerClient, Ready
from swarm.runtime.holder import HolderServer, WeightsHolder
from swarm.sizes import describe_transfer as describe
from swarm.runtime.wire import Kind, Message, encode

log = logging.getLogger(__name__)

LOST_UNLOAD_TIMEOUT_S = 0.25  # UNLOAD to a peer given up: a live one (leaving) answers well within it


@dataclass(frozen=True)
class StagePlacement:
    """Where one stage of a plan runs: units [start, end) on the peer at ``address``
    (None: this source process)."""

    address: str | None
    start: int
    end: int


def check_plan(plan: Sequence[StagePlacement], num_units: int) -> None:
    """Raise ValueError unless the plan covers [0, num_units) in order, source first, peers distinct."""
    if not plan:
        raise ValueError("a plan needs at least one stage")
    if plan[0].address is not None or plan[0].start != 0:
        raise ValueError("the first stage runs in the source process (address None) and holds unit 0")
    if any(s.address is None for s in plan[1:]):
        raise ValueError("only the first stage may run in the source process")
    addresses = [s.address for s in plan[1:]]
    if len(set(addresses)) != len(addresses):
        raise ValueError("a peer may host only one stage of a plan")
    edge = 0
    for s in plan:
        if s.start != edge or s.end <= s.start:
            raise ValueError(f"stage [{s.start}, {s.end}) does not continue the chain at unit {edge}")
        edge = s.end
    if edge != num_units:
        raise ValueError(f"the plan covers units [0, {edge}) of {num_units}")


class Deployment:
    """A loaded plan. ``async with`` loads every stage; exit unloads the peers (idempotent)."""

    def __init__(self, model_dir: Path, plan: Sequence[StagePlacement], *, slots: int, max_len: int,
                 dtype: str = "float32", quant: str | None = None,
                 on_message: Callable[[Message], None] | None = None, control_timeout_s: float = 10.0,
                 kept_shard: Shard | None = None, from_dep: int | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.plan = tuple(plan)
        self.slots, self.max_len, self.dtype, self.quant = slots, max_len, dtype, quant
        self.dep_id = secrets.randbits(31)  # steps of an older deployment are refused by the peers
        self.identity = sockets.new_identity("src")
        self.ready: list[Ready] = []
        self.shard: Shard | None = None
        self._kept_shard = kept_shard  # the last deployment's first stage, when it was this one's
        # The deployment this one replaces (its owner's): a stage kept in place keeps its KV slots.
        self._from_dep = from_dep
        self.kv_kept: tuple[bool, ...] = ()  # per stage, once loaded: its KV slots carried over
        self._on_message = on_message
        self.control_timeout_s = control_timeout_s  # OPEN / CLOSE / UNLOAD replies
        self._ctx = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._data_sock = None  # blocking DEALER to stage 1, used only where the first stage runs
        # A source stage that is the embedding alone runs on the event loop: a table lookup
        # costs less than waking the torch thread for it (about 0.4 ms a token on a 2-vCPU VM).
        self._inline = self.plan[0].end == 1
        self.peers: list[PeerClient] = []  # control: LOAD, OPEN, CLOSE, PING
        self._returns: list[PeerClient] = []  # each peer's data socket: tokens and step errors come home here
        self.lost: frozenset[str] = frozenset()  # addresses of peers given up: unloaded with a short bound
        self.handed_over: frozenset[str] = frozenset()  # peers the next deployment keeps loaded: not unloaded
        self.transfers: dict[str, dict] = {}  # peer address -> weights received so far (done, total, rate_bps)

    @classmethod
    async def load(cls, model_dir: Path, plan: Sequence[StagePlacement], **kwargs) -> "Deployment":
        """A loaded deployment, for an owner that replaces it in place (the Pipeline after a
        lost stage) and so cannot hold it in one ``async with``; close it with ``aclose()``."""
        deployment = cls(model_dir, plan, **kwargs)
        await deployment._open()
        return deployment

    async def __aenter__(self) -> "Deployment":
        await self._open()
        return self

    async def _open(self) -> None:
        self._stack = contextlib.AsyncExitStack()
        try:
            await self._load()
        except BaseException:
            await self.aclose()
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _load(self) -> None:
        self._ctx = sockets.new_context()
        self._stack.callback(self._ctx.term)
        for stage in self.plan[1:]:
            peer = PeerClient(stage.address, self.identity, ctx=self._ctx)
            self.peers.append(await self._stack.enter_async_context(peer))
        statuses = await asyncio.gather(*(p.ping(self.control_timeout_s) for p in self.peers))
        data = [sockets.data_address(p.address, s["data_port"]) for p, s in zip(self.peers, statuses)]
        for address in data:
            back = PeerClient(address, self.identity, on_message=self._on_message, ctx=self._ctx)
            self._returns.append(await self._stack.enter_async_context(back))
        # A ROUTER can route to this identity only once it has heard from it: one round
        # trip each, so the first token (or error) never finds the way home unknown.
        await asyncio.gather(*(r.ping(self.control_timeout_s) for r in self._returns))
        # Exit order (reverse of this): torch thread stopped, then its data socket closed.
        if data:
            data_ctx = sockets.new_sync_context()
            self._stack.callback(data_ctx.term)
            self._data_sock = sockets.connect_dealer(data_ctx, data[0])
            self._stack.callback(self._data_sock.close)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="source-shard")
        self._stack.callback(self._executor.shutdown, wait=True)
        first = self.plan[0]
        began = time.perf_counter()
        kept, self._kept_shard = self._kept_shard, None
        if kept is not None:
            local = asyncio.get_running_loop().create_future()
            local.set_result(kept)
        else:
            local = asyncio.get_running_loop().run_in_executor(self._executor, lambda: Shard.load(
                self.model_dir, first.start, first.end, max_slots=self.slots, max_len=self.max_len, dtype=self.dtype,
                quant=self.quant))
        nexts = data[1:] + [None]
        # A peer serving other weights (another checkpoint or --quant) refuses this LOAD.
        fingerprint = await asyncio.to_thread(weights_fingerprint, Path(self.model_dir), self.quant)
        holders = await self._serve_weights(fingerprint)
        remote = [peer.load(self.model_dir, s.start, s.end, slots=self.slots, max_len=self.max_len,
                            dtype=self.dtype, next_address=nxt, dep=self.dep_id, fingerprint=fingerprint,
                            quant=self.quant, holder=holder, on_progress=self._progress_of(peer.address, s),
                            from_dep=self._from_dep)
                  for peer, s, nxt, holder in zip(self.peers, self.plan[1:], nexts, holders)]
        self.shard, *peer_ready = await asyncio.gather(local, *remote)
        self._stack.push_async_callback(self._unload_peers)
        mine = Ready(time.perf_counter() - began, self.shard.weight_bytes, self.shard.kv_cache_bytes,
                     psutil.Process(os.getpid()).memory_info().rss)
        self.ready = [mine, *peer_ready]
        self.kv_kept = (kept is not None and self._from_dep is not None, *(r.kv_kept for r in peer_ready))
        stages = (f"[{s.start},{s.end})@{s.address or 'source'} {r.load_s:.2f}s" for s, r in zip(self.plan, self.ready))
        log.info("deployment %d ready: %s", self.dep_id, ", ".join(stages))

    async def _serve_weights(self, fingerprint: str) -> list[str]:
        """Serve this model's unit files to the peers that lack them (``runtime.holder``), on the
        interface that reaches them; returns the address each peer's LOAD names as its holder."""
        if not self.peers:
            return []
        hosts = [sockets.local_host_towards(p.address) for p in self.peers]
        bind = hosts[0] if len(set(hosts)) == 1 else "0.0.0.0"
        holder = WeightsHolder({fingerprint: str(self.model_dir)}, self.quant)
        server = await self._stack.enter_async_context(HolderServer(holder, bind))
        port = sockets.port_of(server.address)
        return [f"tcp://[{h}]:{port}" if ":" in h else f"tcp://{h}:{port}" for h in hosts]

    def _progress_of(self, address: str, stage: StagePlacement) -> Callable[[Message], None]:
        """The source's line while a peer receives its weights (and what views read)."""
        def on_progress(message: Message) -> None:
            self.transfers[address] = {"done": message["done"], "total": message["total"], "rate_bps": message["rate"]}
            log.info("stage [%d, %d) on %s: receiving weights, %s", stage.start, stage.end, address,
                     describe(message["done"], message["total"], message["rate"]))

        return on_progress

    async def _unload_peers(self) -> None:
        # A lost peer gets a short bound: one leaving gracefully answers at once (and may then
        # go), a dead one must not hold a recovery for a whole control timeout. If it comes
        # back, its next LOAD replaces the old shard, and its old steps carry an old dep id.
        # A peer whose units the next deployment keeps is left loaded: its LOAD keeps the weights.
        peers = [p for p in self.peers if p.address not in self.handed_over]
        results = await asyncio.gather(*(self._unload(p) for p in peers), return_exceptions=True)
        for peer, result in zip(peers, results):
            if isinstance(result, Exception) and peer.address not in self.lost:
                log.warning("unload on %s failed: %s", peer.address, result)

    async def _unload(self, peer: PeerClient) -> None:
        if peer.address not in self.lost:
            return await peer.unload(self.control_timeout_s, dep=self.dep_id)
        # Its client gave up on it (peers_lost), but a peer leaving gracefully is alive and
        # serves until its stage is unloaded: a connection of its own tells it (UNLOAD names
        # the deployment, not the client).
        async with PeerClient(peer.address, ctx=self._ctx) as fresh:
            await fresh.unload(LOST_UNLOAD_TIMEOUT_S, dep=self.dep_id)

    def peers_lost(self, addresses: Collection[str]) -> None:
        """Requests to these stages' peers fail now: an OPEN or CLOSE to a dead peer would
        otherwise hold the pipeline's control lock for its whole timeout, one after another."""
        self.lost = self.lost | (frozenset(addresses) & {p.address for p in self.peers})
        for peer in self.peers:
            if peer.address in addresses:
                peer.lost("the peer was lost")

    async def release_first_stage(self, keep_for: StagePlacement) -> Shard | None:
        """Stop the local stage (a step still running finishes) and hand its shard over when
        ``keep_for`` is the same units on the source: a re-plan that keeps the source's part
        does not load it again. Otherwise the shard goes now, before a successor loads its own."""
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, wait=True)
        shard, self.shard = self.shard, None
        if shard is not None and keep_for.address is None and (shard.start, shard.end) == (keep_for.start, keep_for.end):
            return shard
        return None

    async def aclose(self, lost: frozenset[str] = frozenset(), handed_over: frozenset[str] = frozenset()) -> None:
        """Unload every peer (the ``lost`` ones within LOST_UNLOAD_TIMEOUT_S) but those ``handed_over``
        to the next deployment with the same units, stop the local shard; safe to call twice."""
        self.lost = self.lost | lost
        self.handed_over = handed_over
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()
        self.peers, self._returns = [], []
        self.shard = None

    # ------------------------------------------------------------ slots and steps

    def _run_shard_job(self, fn, *args) -> asyncio.Future:
        """fn(*args) where the source's shard runs: queued on its torch thread (steps and slot
        jobs in submission order), or done at once, inline, for an embedding-only stage."""
        if not self._inline:
            return asyncio.wrap_future(self._executor.submit(fn, *args))
        done = asyncio.get_running_loop().create_future()
        try:
            done.set_result(fn(*args))
        except Exception as exc:
            done.set_exception(exc)
        return done

    async def open_slots(self, slots: list[int], sampling: SamplingParams = GREEDY, *,
                         fresh_only: bool = False) -> None:
        """Open ``slots`` (empty) on every stage; ``fresh_only``: not on the stages whose KV slots
        carried over from the previous deployment (``kv_kept``: they hold the sequences already)."""
        shard = self.shard
        kept = self.kv_kept if fresh_only else ()
        jobs = [] if kept and kept[0] else [self._run_shard_job(lambda: [shard.open_slot(s, sampling) for s in slots])]
        await asyncio.gather(
            *jobs,
            *(p.open_slots(slots, sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed,
                           self.control_timeout_s) for i, p in enumerate(self.peers, 1) if not (kept and kept[i])),
        )

    async def close_slots(self, slots: list[int]) -> None:
        shard = self.shard
        await asyncio.gather(self._run_shard_job(lambda: [shard.free_slot(s) for s in slots]),
                             *(p.close_slots(slots, self.control_timeout_s) for p in self.peers))

    def submit_first_stage(self, mb: int, step: int, slots: list[int], tokens: torch.Tensor,
                           lengths: list[int] | None, keep: list[int] | None = None,
                           draws: list[int] | None = None, skips: list[list[int]] | None = None) -> asyncio.Future:
        """Queue the local stage's step on the torch thread at once; it sends its hidden states on.

        ``keep`` and ``draws`` as ``Shard.step`` takes them; every stage gets them with the step.
        ``skips`` (a replay): per peer stage in plan order, per row, the positions it already
        holds and skips (the peer drops those leading input rows; this stage computes from ``keep``)
        Resolves to (token ids, or None when sent on; seconds the shard computed). Steps
        run in the order submitted (one torch thread; an embedding-only stage at once, inline)."""
        header = {"dep": self.dep_id, "mb": mb, "step": step, "slots": slots, "lengths": lengths, "keep": keep,
                  "draws": draws, "skips": skips, "src": self.identity}
        return self._run_shard_job(self._compute, header, tokens)

    def _compute(self, header: dict, tokens: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        # On the torch thread (or inline): the hidden states leave from here at once.
        began = time.perf_counter()
        out = self.shard.step(header["slots"], tokens, header["lengths"], header["keep"], header["draws"])
        compute_s = time.perf_counter() - began
        if self._data_sock is None:
            return out, compute_s
        self._data_sock.send_multipart(encode(Message(Kind.STEP, header, (out,))), copy=False, flags=zmq.NOBLOCK)
        return None, compute_s

    async def peer_status(self) -> list[dict]:
        """Every peer's PING status, in plan order."""
        return list(await asyncio.gather(*(p.ping() for p in self.peers)))
