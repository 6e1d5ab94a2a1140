"""The source side of the swarm: gather live announcements, plan, deploy, re-plan.

    config = SourceConfig(interfaces=["127.0.0.1"], model=None)
    async with SwarmSource(config) as s:
        plan = await s.plan()                    # SourcePlan: problem, planner Plan, runtime stages
        async for token in s.generate(prompt_ids, max_new_tokens=64):
            ...
        outs = await s.generate_all([ids1, ids2], max_new_tokens=64)

The source's own device is device 0 of the problem and always holds unit 0, so raw
tokens never leave it. Before each request the live peer set is compared with the
one the deployment was planned for; if a peer joined or left, the source re-plans
and redeploys (between requests, never in the middle of one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Sequence

from zeroconf import InterfaceChoice

from swarm.discovery.directory import Directory, DirectoryConfig
from swarm.discovery.links import ProbeConfig
from swarm.discovery.liveness import LivenessConfig
from swarm.discovery.peer import activation_bytes, measure_profile, new_peer_id
from swarm.discovery.problem import (Device, Workload, build_problem, device_from_announcement,
                                     device_from_profile, links_from_announcements)
from swarm.discovery.prober import LinkProber
from swarm.discovery.txt import short_fingerprint
from swarm.planner.api import plan as plan_problem
from swarm.planner.plan import Plan
from swarm.planner.problem import Problem
from swarm.runtime.wire import Kind

log = logging.getLogger(__name__)

DISCOVERY_S = 3.0  # mDNS answers come within about 1.2 s, then a heartbeat round
LINKS_TIMEOUT_S = 15.0  # longest wait for every live link to be measured before planning anyway
OBJECTIVES = {"latency": "latency", "interactive": "latency", "cycle": "cycle", "batch": "cycle"}


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

    @property
    def workload(self) -> Workload:
        return Workload(self.micro_batches, self.batch_size, self.max_len)


@dataclass(frozen=True)
class SourcePlan:
    """A plan over the live swarm: the problem it solved, the planner's answer, and the
    stages in the runtime's terms (address None = this process)."""

    problem: dict
    plan: Plan
    stages: tuple  # tuple[swarm.runtime.deploy.Stage, ...]
    peer_ids: frozenset[str]  # the live peers the problem was built from

    def describe(self) -> list[str]:
        names = [d["name"] for d in self.problem["devices"]]
        return [f"{names[s.device]}: units [{s.start}, {s.end})" for s in self.plan.stages]


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
        self._pipeline = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._tasks: list[asyncio.Task] = []  # discovery and probes, owned by the TaskGroup in _stack
        self._started = 0.0

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
            from swarm.model.store import resolve_model

            self.model_dir = await asyncio.to_thread(resolve_model, self.config.model)
        if self.profile is None:
            self.profile = await asyncio.to_thread(measure_profile, self.model_dir, self.config.threads,
                                                   None, self.config.quant)
        fingerprint = short_fingerprint(self.profile["model"]["fingerprint"])
        self.directory = await self._stack.enter_async_context(Directory(DirectoryConfig(
            interfaces=self.config.interfaces, seeds=self.config.seeds, mdns=self.config.mdns, fingerprint=fingerprint,
            liveness=self.config.liveness), own_id=self.peer_id))
        # Peers do not probe a source (it serves nothing), so it measures both directions itself.
        self.prober = LinkProber(self.directory, activation_bytes(self.profile), self.config.probe, both_ways=True,
                                 busy=self._generating)
        tg = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._tasks = [tg.create_task(self.directory.run()), tg.create_task(self.prober.run())]
        self._started = time.monotonic()

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Tear down the pipeline, stop discovery; safe to call twice."""
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            await pipeline.aclose()
        for task in self._tasks:
            task.cancel()
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    def _generating(self) -> bool:
        return self._pipeline is not None and self._pipeline.micro_batches_in_flight > 0

    # ------------------------------------------------------------ gathering

    def diagnostic(self) -> str:
        """What discovery tried and heard: for the error when too few peers were found."""
        return self.directory.diagnostic() if self.directory is not None else "discovery not started"

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

    async def problem(self) -> dict:
        """The planner problem over this device and the live peers (the JSON `swarm plan` reads)."""
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
        devices = [device_from_profile(self.profile, self.peer_id, self.config.name, self.config.mem_bytes)]
        for pid, rec in sorted(live.items()):
            devices.append(await self._device(rec))
        links = links_from_announcements([r.announcement for r in live.values()])
        links.update({(self.peer_id, pid): link for pid, link in self.prober.links.items()})
        links.update({(pid, self.peer_id): link for pid, link in self.prober.links_back.items()})
        return build_problem(self.profile, devices, links, self.config.workload)

    async def _device(self, rec) -> Device:
        if not rec.announcement.summarised:
            return device_from_announcement(rec.announcement)
        # The TXT record only had room for a summary: fetch the full profile over INFO.
        client = self.directory.client(rec.host, rec.port)
        info = (await client.request(Kind.INFO)).get("info") or {}
        return device_from_profile(info["profile"], rec.announcement.peer_id, rec.announcement.name,
                                   rec.announcement.mem_bytes)

    async def plan(self) -> SourcePlan:
        """Gather, build the problem and plan (raises InfeasibleError when nothing fits)."""
        from swarm.runtime.deploy import Stage

        data = await self.problem()
        plan = plan_problem(Problem.from_json(data), objective=OBJECTIVES[self.config.objective],
                            inflight=self.config.micro_batches)
        ids = data["peer_ids"]
        live = self.directory.live
        stages = tuple(Stage(None if s.device == 0 else f"tcp://{live[ids[s.device]].host}:{live[ids[s.device]].port}",
                             s.start, s.end) for s in plan.stages)
        result = SourcePlan(data, plan, stages, frozenset(ids[1:]))
        log.info("plan (%s, %.2f ms/token predicted): %s", plan.objective, plan.latency_s * 1e3,
                 "; ".join(result.describe()))
        return result

    # ------------------------------------------------------------ deploying and generating

    def needs_replan(self) -> bool:
        """A peer joined or left since the deployed plan was made."""
        return self.current is None or self.current.peer_ids != frozenset(self.directory.live)

    async def deploy(self) -> SourcePlan:
        """Plan over the live swarm and (re)deploy if the stages changed."""
        from swarm.runtime.engine import Pipeline, PipelineConfig
        from swarm.runtime.schedule import Layout, Mode

        planned = await self.plan()
        if self._pipeline is None:
            if self.model_dir is None:
                raise RuntimeError("deploying needs a model folder (SourceConfig.model)")
            self._pipeline = Pipeline(PipelineConfig(
                self.model_dir, planned.stages, layout=Layout(self.config.micro_batches, self.config.batch_size),
                mode=Mode.NO_BUBBLES, max_len=self.config.max_len, dtype=self.config.dtype,
                quant=self.config.quant))
            await self._pipeline.__aenter__()
        elif self.current is None or planned.stages != self.current.stages:
            await self._pipeline.redeploy(planned.stages)
        self.current = planned
        return planned

    async def pipeline(self):
        """The deployed pipeline, re-planned first if the live peer set changed."""
        if self._pipeline is None or self.needs_replan():
            await self.deploy()
        return self._pipeline

    async def generate(self, prompt: Sequence[int], max_new_tokens: int, sampling=None,
                       stop_ids: Sequence[int] = ()) -> AsyncIterator[int]:
        """Stream one request's token ids through the swarm."""
        from swarm.model.sampling import GREEDY

        pipe = await self.pipeline()
        async for token in pipe.generate(prompt, max_new_tokens, sampling or GREEDY, stop_ids):
            yield token

    async def generate_all(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling=None,
                           stop_ids: Sequence[int] = ()) -> list[list[int]]:
        from swarm.model.sampling import GREEDY

        pipe = await self.pipeline()
        return await pipe.generate_all(prompts, max_new_tokens, sampling or GREEDY, stop_ids)

