"""The source side of the swarm: gather live announcements, plan, deploy, re-plan.

    config = SourceConfig(interfaces=["127.0.0.1"], model=None)
    async with SwarmSource(config) as s:
        plan = await s.plan()                    # SourcePlan: problem, planner Plan, runtime stages
        async for token in s.generate(prompt_ids, max_new_tokens=64):
            ...
        outs = await s.generate_all([ids1, ids2], max_new_tokens=64)
        async with await s.open_session(sampling) as chat:     # a multi-turn sequence
            async for token in chat.generate(turn_ids, 200, stop_ids):
                ...
        s.state()                                # one immutable snapshot for views

The source's own device is device 0 of the problem and always holds unit 0, so raw
tokens never leave it. A deployed peer that the directory drops (missed heartbeats,
an mDNS goodbye) is a lost stage: the pipeline re-plans through ``_replan`` over the
peers still alive and replays every live sequence, mid-answer. A peer that joins is
planned in before the next request or session.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Sequence

from zeroconf import InterfaceChoice

from swarm.discovery.directory import SEED_REFRESH_S, Directory, DirectoryConfig
from swarm.discovery.links import ProbeConfig
from swarm.discovery.liveness import LivenessConfig
from swarm.discovery.peer import activation_bytes, measure_profile, new_peer_id
from swarm.discovery.problem import (Device, Workload, build_problem, device_for_model, device_from_announcement,
                                     device_from_profile, link_matrices, links_from_announcements,
                                     predicted_step_costs)
from swarm.discovery.prober import LinkProber
from swarm.discovery.txt import short_fingerprint
from swarm.model.draft import load_drafter
from swarm.model.sampling import GREEDY, SamplingParams
from swarm.model.store import resolve_model
from swarm.model.unitfiles import held_form
from swarm.planner.api import plan as plan_problem
from swarm.planner.problem import InfeasibleError, Problem
from swarm.planner.replan import decide, objective_value, profile_drift
from swarm.planner.warm import HORIZON_TOKENS, prefer_warm
from swarm.runtime.client import PeerError
from swarm.runtime.engine import Pipeline, PipelineConfig
from swarm.runtime.hopcost import measure_local_hop_overhead
from swarm.runtime.recovery import RecoveryEvent, Replanned, StageLost
from swarm.runtime.schedule import Layout, Mode
from swarm.runtime.session import Session
from swarm.runtime.speculate import DEFAULT_SPECULATION, Speculation, SpeculationStats
from swarm.runtime.stats import StageStats
from swarm.runtime.wire import Kind
from swarm.sizes import format_bytes
from swarm.source_plan import SourcePlan
from swarm.source_state import SourceState

log = logging.getLogger(__name__)

DISCOVERY_S = 3.0  # mDNS answers come within about 1.2 s, then a heartbeat round
LINKS_TIMEOUT_S = 15.0  # longest wait for every live link to be measured before planning anyway
OBJECTIVES = {"latency": "latency", "interactive": "latency", "cycle": "cycle", "batch": "cycle"}
STATS_INTERVAL_S = 0.5  # between polls of the deployed stages' counters (for views)
RECOVERIES_KEPT = 20


def not_enough_memory(exc: InfeasibleError, live: int, diagnostic: str) -> str:
    """What a person reads when no plan fits: how much memory is missing, and what to do."""
    if exc.needed_bytes > exc.available_bytes:
        missing = exc.needed_bytes - exc.available_bytes
        text = (f"not enough memory in the swarm: the model needs {format_bytes(exc.needed_bytes)}, "
                f"this device and {live} peer(s) offer {format_bytes(exc.available_bytes)}: "
                f"{format_bytes(missing)} missing. Start more peers (`swarm join` on another device), "
                f"give them more memory (--mem), or shorten the context (--max-len).")
    else:
        text = f"no plan fits the swarm: {exc}"
    if live == 0:
        text += "\n" + diagnostic + "\nOr try `swarm chat --local 2` to start peers on this machine."
    return text


def _own_hop_overhead(threads: int) -> float:
    """The source's hop overhead: a torch worker of its own on loopback (0 if that fails)."""
    try:
        return measure_local_hop_overhead(threads)
    except (TimeoutError, RuntimeError, OSError) as exc:
        log.warning("could not measure this device's hop overhead: %s", exc)
        return 0.0


@dataclass(frozen=True)
class SourceConfig:
    interfaces: list[str] | InterfaceChoice  # explicit, always
    model: str | Path | None = None  # model folder; None: the bundled default
    seeds: tuple[str, ...] = ()  # "host:port" for networks that block multicast
    mdns: bool = True  # False: seeds only
    name: str = "source"
    threads: int = 1
    mem_bytes: int | None = None  # usable memory of this device; None: the profile's
    profile: dict | None = None  # a measured profile to use instead of profiling
    objective: str = "latency"  # "latency" for interactive use, "cycle" for batch work
    micro_batches: int = 1
    batch_size: int = 1
    max_len: int = 512
    dtype: str = "float32"
    quant: str | None = None  # int8 | int4 weights (issue 15): the profile's fingerprint must say the same
    min_peers: int = 0  # plan as soon as this many peers are live (else after discovery_s)
    discovery_s: float = DISCOVERY_S
    links_timeout_s: float = LINKS_TIMEOUT_S
    liveness: LivenessConfig = field(default_factory=LivenessConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    step_timeout_s: float = 30.0  # a step not back within this counts as a lost stage (see PipelineConfig)
    seed_refresh_s: float = SEED_REFRESH_S  # between INFO requests to seeds (a restarted seed is found this late)
    stats_interval_s: float = STATS_INTERVAL_S
    # A plan that moves weights must repay the transfer within this many tokens (swarm.planner.warm).
    warm_horizon_tokens: int = HORIZON_TOKENS
    speculate: str = DEFAULT_SPECULATION  # off | ngram | model (swarm.runtime.speculate)
    speculate_model: str | Path | None = None  # the draft model with speculate "model", on this device's CPU

    @property
    def workload(self) -> Workload:
        return Workload(self.micro_batches, self.batch_size, self.max_len)


class SwarmSource:
    """Discovery, link probes, planning and the pipeline of one source. ``async with`` only."""

    def __init__(self, config: SourceConfig) -> None:
        if config.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {config.objective!r}")
        self.config = config
        self.peer_id = new_peer_id()
        self.profile: dict | None = config.profile
        self.model_dir: Path | None = None
        self.directory: Directory | None = None
        self.prober: LinkProber | None = None
        self.current: SourcePlan | None = None
        self._pipeline: Pipeline | None = None  # its lifetime an entry of _stack
        self._starting: Pipeline | None = None  # the Pipeline whose first deployment is loading
        self._stack: contextlib.AsyncExitStack | None = None
        self._tasks: list[asyncio.Task] = []  # discovery, probes, watchers: owned by the TaskGroup in _stack
        self._started = 0.0
        self._deploying = asyncio.Lock()
        self._stats: tuple[StageStats, ...] = ()  # the pipeline's at the last poll
        # The last RECOVERIES_KEPT, each numbered from 1 over this source's life: a reader that
        # showed up to number n shows what comes after, however many the deque has dropped.
        self._recoveries: collections.deque[RecoveryEvent] = collections.deque(maxlen=RECOVERIES_KEPT)
        self._recovery_count = 0
        self._transfers: dict[str, dict] = {}  # peer name -> weights it is receiving (done, total, rate_bps)
        self.hop_overhead_s = 0.0  # what a hop costs this device (swarm.runtime.hopcost), measured on open
        self._drift_notes: dict[tuple[int, int], str] = {}  # (plan, stage) -> what its profile got wrong
        self._held: dict[str, frozenset[int]] = {}  # open peers: the units of this model in their cache

    async def __aenter__(self) -> SwarmSource:
        self._stack = contextlib.AsyncExitStack()
        try:
            await self._open()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def _open(self) -> None:
        if self.config.model is not None or self.profile is None:
            self.model_dir = await asyncio.to_thread(resolve_model, self.config.model)
        if self.profile is None:
            self.profile = await asyncio.to_thread(measure_profile, self.model_dir, self.config.threads,
                                                   None, self.config.quant)
        self.hop_overhead_s = await asyncio.to_thread(_own_hop_overhead, self.config.threads)
        fingerprint = short_fingerprint(self.profile["model"]["fingerprint"])
        self.directory = await self._stack.enter_async_context(Directory(DirectoryConfig(
            interfaces=self.config.interfaces, seeds=self.config.seeds, mdns=self.config.mdns, fingerprint=fingerprint,
            liveness=self.config.liveness, seed_refresh_s=self.config.seed_refresh_s), own_id=self.peer_id))
        # Peers do not probe a source (it serves nothing), so it measures both directions itself.
        self.prober = LinkProber(self.directory, activation_bytes(self.profile), self.config.probe, both_ways=True,
                                 busy=self._generating)
        tg = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._tasks = [tg.create_task(self.directory.run()), tg.create_task(self.prober.run()),
                       tg.create_task(self._watch_stages()), tg.create_task(self._poll_stats())]
        self._stack.callback(lambda: [t.cancel() for t in self._tasks])  # before the TaskGroup waits for them
        self._started = time.monotonic()

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Tear down the pipeline, stop discovery; safe to call twice."""
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()  # the pipeline first (entered last), then the tasks, then discovery
        self._pipeline = None

    def _generating(self) -> bool:
        return self._pipeline is not None and self._pipeline.micro_batches_in_flight > 0

    # ------------------------------------------------------------ gathering

    async def wait_for_peers(self) -> None:
        """Discovery window: until min_peers are live, or discovery_s has passed."""
        d = self.directory
        if self.config.min_peers:
            if not await d.wait_for(lambda live: len(live) >= self.config.min_peers, self.config.links_timeout_s):
                log.warning("only %d of %d peers live:\n%s", len(d.live), self.config.min_peers, d.diagnostic())
        else:
            await asyncio.sleep(max(0.0, self._started + self.config.discovery_s - time.monotonic()))

    def links_complete(self) -> bool:
        """Every live pair measured in at least one direction, and the source to every peer."""
        live = self.directory.live
        if set(live) - set(self.prober.links) or set(live) - set(self.prober.links_back):
            return False
        links = links_from_announcements([r.announcement for r in live.values()])
        return all((u, v) in links or (v, u) in links for u in live for v in live if u < v)

    async def problem(self, gather: bool = True) -> dict:
        """The planner problem over this device and the live peers (the JSON `swarm plan` reads).
        ``gather=False``: the peers live now, without waiting for discovery (re-planning after a loss)."""
        if gather:
            await self.wait_for_peers()
            deadline = time.monotonic() + self.config.links_timeout_s
            version = self.directory.version
            while not self.links_complete() and time.monotonic() < deadline and not self.directory.closed:
                version = await self.directory.wait_change(version, 0.1)
        if self.directory.closed:
            raise RuntimeError("the source closed while gathering peers")
        if not self.links_complete():
            log.warning("planning with links still unmeasured (treated as absent)")
        live = dict(self.directory.live)
        devices = [device_from_profile(self.profile, self.peer_id, self.config.name, self.config.mem_bytes,
                                       self.hop_overhead_s)]
        for pid, rec in sorted(live.items()):
            devices.append(await self._device(rec))
        links = links_from_announcements([r.announcement for r in live.values()])
        links.update({(self.peer_id, pid): link for pid, link in self.prober.links.items()})
        links.update({(pid, self.peer_id): link for pid, link in self.prober.links_back.items()})
        return build_problem(self.profile, devices, links, self.config.workload)

    async def _device(self, rec) -> Device:
        a = rec.announcement
        other_model = a.fingerprint != short_fingerprint(self.profile["model"]["fingerprint"])
        if not a.summarised and not other_model:
            return device_from_announcement(a)
        # The TXT record only had room for a summary, or an open peer measured another model:
        # fetch its full profile over INFO.
        client = self.directory.client(rec.host, rec.port)
        info = (await client.request(Kind.INFO)).get("info") or {}
        if other_model:
            # The units of this model it already holds (its unit cache), so a plan can leave them there.
            cached = (await client.ping()).get("cached") or {}
            units = cached.get(short_fingerprint(self.profile["model"]["fingerprint"]), {})
            self._held[a.peer_id] = frozenset(units.get(held_form(self.config.dtype, self.config.quant), []))
            return device_for_model(info["profile"], self.profile, a.peer_id, a.name, a.mem_bytes,
                                    a.hop_overhead_us / 1e6)
        return device_from_profile(info["profile"], a.peer_id, a.name, a.mem_bytes, a.hop_overhead_us / 1e6)

    async def plan(self, gather: bool = True) -> SourcePlan:
        """Gather, build the problem and plan (raises InfeasibleError when nothing fits)."""
        data = await self.problem(gather)
        problem = Problem.from_json(data)
        objective, inflight = OBJECTIVES[self.config.objective], self.config.micro_batches
        best = plan_problem(problem, objective=objective, inflight=inflight)
        ids = data["peer_ids"]
        # Units already in place stay there unless moving them pays back (swarm.planner.warm).
        every = frozenset(range(problem.n_units))
        held = [every] + [self._held.get(pid, every) for pid in ids[1:]]
        choice = prefer_warm(problem, best, held, [u["weight_bytes"] for u in self.profile["units"]],
                             lambda p: objective_value(p, objective),
                             lambda p: plan_problem(p, objective=objective, inflight=inflight),
                             self.config.warm_horizon_tokens)
        if choice.plan is not best or choice.move_s:
            log.info("weights: %s", choice.reason)
        plan = choice.plan
        result = SourcePlan.build(data, plan, {pid: f"tcp://{rec.host}:{rec.port}"
                                               for pid, rec in self.directory.live.items()})
        log.info("plan (%s, %.2f ms/token predicted): %s", plan.objective, plan.latency_s * 1e3,
                 "; ".join(result.describe()))
        return result

    # ------------------------------------------------------------ deploying and generating

    def needs_replan(self) -> bool:
        """A peer joined or left since the deployed plan was made, or the links moved
        enough that another plan is now clearly better (swarm.planner.replan)."""
        if self.current is None or self.current.peer_ids != frozenset(self.directory.live):
            return True
        return self._links_changed_the_plan()

    def _links_changed_the_plan(self) -> bool:
        """The deployed plan's problem with the links measured now: does the best plan change?"""
        links = links_from_announcements([r.announcement for r in self.directory.live.values()])
        links.update({(self.peer_id, pid): link for pid, link in self.prober.links.items()})
        links.update({(pid, self.peer_id): link for pid, link in self.prober.links_back.items()})
        bandwidth, latency = link_matrices(self.current.problem["peer_ids"], links)
        decision = decide(Problem.from_json(self.current.problem), self.current.plan.stages, bandwidth, latency,
                          OBJECTIVES[self.config.objective], self.config.micro_batches)
        if decision.replan:
            log.info("re-planning: %s", decision.reason)
        return decision.replan

    async def deploy(self) -> SourcePlan:
        """Plan over the live swarm and (re)deploy if the stages changed; open sequences
        continue on the new stages (their histories are replayed)."""
        async with self._deploying:
            planned = await self.plan()
            if self._pipeline is None:
                if self.model_dir is None:
                    raise RuntimeError("deploying needs a model folder (SourceConfig.model)")
                config = PipelineConfig(
                    self.model_dir, planned.stages, layout=Layout(self.config.micro_batches, self.config.batch_size),
                    mode=Mode.NO_BUBBLES, max_len=self.config.max_len, dtype=self.config.dtype, quant=self.config.quant,
                    step_timeout_s=self.config.step_timeout_s, speculate=Speculation(self.config.speculate))
                drafter = None
                if config.speculate is Speculation.MODEL:
                    drafter = await asyncio.to_thread(load_drafter, self.config.speculate_model, self.model_dir,
                                                      slots=config.layout.slots, max_len=config.max_len)
                self.current = planned  # the replanner reads it as soon as the pipeline runs
                # _watch_stages tells it of a peer lost while it loads: it re-plans at once
                # rather than wait out a LOAD that a dead peer never answers.
                self._starting = Pipeline(config, replan=self._replan, on_recovery=self._record_recovery,
                                          drafter=drafter)
                try:
                    self._pipeline = await self._stack.enter_async_context(self._starting)
                finally:
                    self._starting = None
            elif self.current is None or planned.stages != self.current.stages:
                self.current = planned
                await self._pipeline.redeploy(planned.stages)
            else:
                self.current = planned
            # A verify step's cost by width, as the plan predicts it: new sequences draft by it.
            self._pipeline.step_costs = predicted_step_costs(self.current.problem, self.current.plan.stages,
                                                             self._pipeline.config.max_draft + 1)
            return self.current  # _replan's, where a peer was lost while the plan loaded

    async def _deployed(self) -> Pipeline:
        """The pipeline, deployed (and re-planned first if a peer joined or left); after a
        loss it could not recover from, a new one over whoever is live now."""
        if self._pipeline is not None and self._pipeline.broken:
            broken, self._pipeline, self.current = self._pipeline, None, None
            await broken.aclose()  # early; the exit stack's own aclose() of it is then a no-op
        if self._pipeline is None or (self.needs_replan() and not self._pipeline.recovering):
            await self.deploy()
        return self._pipeline

    async def _replan(self, suspects: frozenset[str]) -> Replanned:
        """The pipeline lost a stage: a plan over the peers still alive (the Pipeline's ``replan``).

        A step that failed or came back late names no peer: wait, within the heartbeat
        bound, for the directory to drop a planned one, then plan over whoever is live."""
        old = self.current
        by_address = old.peer_ids_by_address()
        names = old.names_by_address()
        suspect_ids = {by_address[a] for a in suspects if a in by_address}

        def settled(live) -> bool:
            gone = set(old.peer_ids) - set(live)
            return suspect_ids <= gone if suspect_ids else bool(gone)

        await self.directory.wait_for(settled, self.config.liveness.drop_bound_s)
        live = set(self.directory.live)
        lost = tuple(sorted(names[a] for a, pid in by_address.items() if pid not in live or pid in suspect_ids))
        try:
            planned = await self._plan_now()
        except InfeasibleError as exc:
            raise StageLost(not_enough_memory(exc, len(live), self.directory.diagnostic())) from None
        self.current = planned
        return Replanned(planned.stages, lost)

    async def _plan_now(self) -> SourcePlan:
        """A plan over the peers live now. Enough memory but no chain of measured links (a
        peer that joined lately, not yet probed) is worth the wait for the links; too
        little memory fails at once."""
        try:
            return await self.plan(gather=False)
        except InfeasibleError as exc:
            if exc.needed_bytes > exc.available_bytes or self.links_complete():
                raise
        log.info("re-planning: waiting for links to be measured")
        deadline = time.monotonic() + self.config.links_timeout_s
        version = self.directory.version
        while not self.links_complete() and time.monotonic() < deadline and not self.directory.closed:
            version = await self.directory.wait_change(version, 0.1)
        return await self.plan(gather=False)

    async def _watch_stages(self) -> None:
        """Tell the pipeline at once when the directory drops a peer that holds a stage."""
        version = self.directory.version
        while not self.directory.closed:
            version = await self.directory.wait_change(version, 3600.0)
            pipeline, current = self._pipeline or self._starting, self.current
            if pipeline is None or current is None:
                continue
            live = self.directory.live
            gone = [a for a, pid in current.peer_ids_by_address().items() if pid not in live]
            if gone:
                names = current.names_by_address()
                pipeline.stage_lost(gone, f"peer {', '.join(names[a] for a in gone)} left the swarm")

    async def _poll_stats(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_interval_s)
            if self._pipeline is not None and not self._pipeline.recovering:
                self._transfers = {}
                try:
                    self._stats = tuple(await self._pipeline.stage_stats())
                except (PeerError, TimeoutError):
                    self._stats = ()
                self._check_profiles()
            elif self.current is not None:  # a plan is loading: its peers may be receiving weights
                self._transfers = await self._receiving_weights()

    async def _receiving_weights(self) -> dict[str, dict]:
        """Peer name -> the weights it is receiving (its PING's ``transfer``), for the views."""
        counters = await self.peer_counters(timeout=self.config.stats_interval_s)
        live = self.directory.live
        return {live[pid].announcement.name: dict(c["transfer"]) for pid, c in sorted(counters.items())
                if c.get("transfer") and pid in live}

    def _check_profiles(self) -> None:
        """Warn, once per plan and stage, when a stage's live decode steps take more than
        PROFILE_DRIFT from what its profile predicted (a profile taken under load, say)."""
        current, stats = self.current, self._stats
        if current is None or len(stats) != len(current.plan.stages):
            return
        decode_only = self.config.batch_size  # token positions per step when no prompt is in the interval
        measured = [s.busy_share / s.steps_per_s if s.steps_per_s > 0 and s.tokens_per_s <= decode_only * s.steps_per_s
                    else None for s in stats]
        devices = current.problem["devices"]
        names = [d["name"] for d in devices]
        # a shard's step time holds its units and the step constant (not the hop overhead)
        predicted = [c + float(devices[s.device].get("step_overhead", 0.0))
                     for c, s in zip(current.plan.compute_s, current.plan.stages)]
        for k, predicted, got in profile_drift(predicted, measured):
            key = (id(current), k)
            if key not in self._drift_notes:
                # A note in the views and the log, not a warning: a chat prints warnings between its tokens.
                self._drift_notes[key] = (f"stage {k} on {names[current.plan.stages[k].device]} computes a decode step "
                                        f"in {got * 1e3:.2f} ms, its profile says {predicted * 1e3:.2f} ms: "
                                        "re-profile it on a quiet device (swarm profile)")
                log.info("%s", self._drift_notes[key])

    async def open_session(self, sampling: SamplingParams = GREEDY, *, speculate: Speculation | None = None) -> Session:
        """A new sequence on the deployed pipeline; ``async with`` closes it. ``speculate``:
        this sequence's drafting in place of the config's (``Pipeline.open_session``)."""
        return await (await self._deployed()).open_session(sampling, speculate=speculate)

    async def generate(self, prompt: Sequence[int], max_new_tokens: int, sampling: SamplingParams = GREEDY,
                       stop_ids: Sequence[int] = ()) -> AsyncIterator[int]:
        """Stream one request's token ids through the swarm."""
        pipe = await self._deployed()
        async for token in pipe.generate(prompt, max_new_tokens, sampling, stop_ids):
            yield token

    async def generate_all(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                           sampling: SamplingParams = GREEDY, stop_ids: Sequence[int] = ()) -> list[list[int]]:
        """Every prompt's tokens, admitted at once (a seeded ``sampling`` gives prompt i ``row_sampling(sampling, i)``)."""
        pipe = await self._deployed()
        return await pipe.generate_all(prompts, max_new_tokens, sampling, stop_ids)

    # ------------------------------------------------------------ what views read

    @property
    def speculation(self) -> SpeculationStats:
        """Drafts verified and accepted on the deployed pipeline so far (zeros before one)."""
        return SpeculationStats() if self._pipeline is None else self._pipeline.speculation

    async def peer_counters(self, timeout: float) -> dict[str, dict]:
        """Every live peer's own counters (its PING status) by peer id; silent peers left out."""
        async def one(rec) -> dict | None:
            try:
                return await self.directory.client(rec.host, rec.port).ping(timeout=timeout)
            except (PeerError, TimeoutError):
                return None

        live = dict(self.directory.live)
        answers = await asyncio.gather(*(one(rec) for rec in live.values()))
        return {pid: status for pid, status in zip(live, answers) if status is not None}

    def _record_recovery(self, event: RecoveryEvent) -> None:
        self._recovery_count += 1
        self._recoveries.append(dataclasses.replace(event, number=self._recovery_count))

    def state(self) -> SourceState:
        """One immutable snapshot: live peers, measured links, the deployed plan, the stages'
        counters at the last poll, and the recoveries so far."""
        current, pipeline = self.current, self._pipeline
        live = dict(self.directory.live) if self.directory is not None else {}
        profile = self.profile or {}
        return SourceState(
            source_id=self.peer_id, source_name=self.config.name, source_profile=profile,
            source_mem=self.config.mem_bytes or profile.get("device", {}).get("mem_bytes", 0),
            announcements={pid: rec.announcement for pid, rec in live.items()},
            source_links=dict(self.prober.links) if self.prober is not None else {},
            problem=current.problem if current else None, plan=current.plan if current else None,
            stats=self._stats if pipeline is not None else (),
            micro_batches=pipeline.micro_batches_in_flight if pipeline is not None else None,
            model=self.model_dir.name if self.model_dir else "", recoveries=tuple(self._recoveries),
            deployed=pipeline is not None, recovering=pipeline is not None and pipeline.recovering,
            diagnostic=self.directory.diagnostic() if self.directory is not None else "discovery not started",
            links_measured=len(self.prober.links) if self.prober is not None else 0,
            peer_ids=frozenset(current.peer_ids) if current else frozenset(),
            transfers=dict(self._transfers),
            notes=tuple(note for (plan, _), note in sorted(self._drift_notes.items())
                        if current is not None and plan == id(current)))
