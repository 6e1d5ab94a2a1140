#!/usr/bin/env python3
"""An emulated home network on one machine: one `swarm join` peer per network namespace.

    python bootstrap/netns/homenet.py up home            # peers/scenarios/home.json; prints the peers
    python bootstrap/netns/homenet.py shape home src cloud 10   # what src sends to cloud: 10 Mbit/s
    python bootstrap/netns/homenet.py status [home]
    python bootstrap/netns/homenet.py down [home | --all]

A scenario (peers/scenarios/NAME.json) names the devices (CPU share, memory offer,
which one is the source) and the link rates per direction. Here each device gets

- a network namespace `<tag>-<name>` with a veth to a bridge in `<tag>-hub`
  (10.77.0.k/24; mDNS stays on that bridge, nothing reaches a real interface);
- per-destination shaping on its side of the veth: an htb class per other device
  (what this device sends to that one) holding a `tbf` with a one-frame burst, so a
  message is paced at the link's rate rather than let through by a large bucket; the
  kernel has no netem, so no delay is added: round trips are the veth's and the software's;
- a CPU cgroup (v1 `cpu.cfs_quota_us`, v2 `cpu.max`) with the device's CPU share over a
  short period (5 ms), so a decode step of a few ms is slowed evenly rather than run at
  full speed and then stopped for most of a 100 ms period;
- its own profile cache, so the peer profiles itself inside its quota (kept between
  runs of the same scenario; `up --reprofile` measures again).

The source device runs no peer: whoever drives the scenario (benchmarks/testbed.py, the
slow test) starts its own source process there with `Homenet.popen(SOURCE, ...)`.
Teardown finds everything by the tag (namespaces `<tag>-*`, cgroups `swarm-homenet-<tag>-*`,
the state file), so `down` cleans up after a crash, a SIGKILL or a Ctrl-C of `up` too.
Needs root, iproute2 (ip, tc) and a cpu cgroup controller. Standard library only.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = REPO / "peers" / "scenarios"
STATE_DIR = Path(os.environ.get("SWARM_HOMENET_STATE", "/run/swarm-homenet"))
LOG_DIR = Path(os.environ.get("SWARM_HOMENET_LOGS", "/tmp/swarm-homenet-logs"))
CGROUP_V1 = Path("/sys/fs/cgroup/cpu")
CGROUP_V2 = Path("/sys/fs/cgroup")
CGROUP_PREFIX = "swarm-homenet-"  # flat at the root: each device weighs like one ordinary process
SUBNET = "10.77.0"
UNSHAPED = "10gbit"  # the default class: ARP, mDNS multicast and anything not to a known peer
# tbf's bucket must hold one whole frame and refills between two tokens, so the first frame
# of every message passes unpaced: with 1500-byte frames a decode step's 2.3 KB activation
# took about 6 ms at 1 Mbit/s where a real link of that rate takes 19 (docs/testbed.md). So
# the routes of slow links carry small frames (their TCP segments are cut to the route's
# MTU, a tbf's bucket holds one of them). Not every link: MTU 576 on the veths (2026-12-06)
# put the 1 Mbit/s rows within 15% but cost the throttled devices CPU on every faster link
# (2.6 times the packets; a source with no hop at all ran 18% slower than its profile).
MTU = 1500  # the veths', and the routes' of fast links
SLOW_MTU = 576  # the routes' of links at most SLOW_LINK_MBIT (IPv4's minimum reassembly size)
SLOW_LINK_MBIT = 5.0  # above it a 1500-byte frame passes in at most 2.4 ms: within a hop's noise


def route_mtu(mbit: float) -> int:
    return SLOW_MTU if mbit <= SLOW_LINK_MBIT else MTU


def tbf_burst(mbit: float) -> int:
    """One whole frame of the link's route: a smaller bucket drops full packets, a larger one lets bursts through."""
    return route_mtu(mbit) + 100


TBF_LATENCY = "10s"  # queue room: a 64 KiB probe on a 0.1 Mbit/s link waits about 5 s
JOIN_TIMEOUT_S = 900.0  # a first start profiles the device for the model inside its quota
STOP_GRACE_S = 5.0  # SIGTERM (mDNS goodbye), then SIGKILL
HEARTBEAT_S = 0.5
PROBE_INTERVAL_S = 6.0  # link probes: a re-shaped link shows in the measurements within seconds
PR_SET_PDEATHSIG = 1


# ---------------------------------------------------------------- scenarios (pure)

@dataclass(frozen=True)
class DeviceSpec:
    name: str
    cpus: float  # share of one CPU
    mem: str | None  # memory offer (swarm join --mem), e.g. "512M"
    source: bool = False
    like: str = ""


@dataclass(frozen=True)
class Scenario:
    name: str
    devices: tuple[DeviceSpec, ...]
    rates: dict[tuple[str, str], float]  # Mbit/s from a to b, every ordered pair
    cpu_period_us: int = 5000
    sweep_links: tuple[tuple[str, str], ...] = ()
    sweep_mbit: tuple[float, ...] = ()
    workload: dict = field(default_factory=dict)

    @property
    def source(self) -> DeviceSpec:
        return next(d for d in self.devices if d.source)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.devices]

    def index(self, name: str) -> int:
        return self.names.index(name)

    @classmethod
    def load(cls, name_or_path: str | Path) -> "Scenario":
        path = Path(name_or_path)
        if not path.suffix:
            path = SCENARIOS / f"{name_or_path}.json"
        if not path.exists():
            known = ", ".join(sorted(p.stem for p in SCENARIOS.glob("*.json")))
            raise ValueError(f"no scenario {name_or_path!r} (known: {known})")
        return cls.from_json(path.stem, json.loads(path.read_text()))

    @classmethod
    def from_json(cls, name: str, data: dict) -> "Scenario":
        devices = tuple(DeviceSpec(n, float(d["cpus"]), d.get("mem"), bool(d.get("source")), d.get("like", ""))
                        for n, d in data["devices"].items())
        names = [d.name for d in devices]
        if sum(d.source for d in devices) != 1:
            raise ValueError(f"scenario {name}: exactly one device must be the source")
        if not all(re.fullmatch(r"[a-z][a-z0-9]{0,7}", n) for n in names):
            raise ValueError(f"scenario {name}: device names are 1-8 lowercase letters or digits")
        if not all(0 < d.cpus <= 1 for d in devices):
            raise ValueError(f"scenario {name}: cpus is a share of one CPU, in (0, 1]")
        links = dict(data.get("links", {}))
        default = float(links.pop("default", 1000))
        rates = {(a, b): default for a in names for b in names if a != b}
        for key, mbit in links.items():
            for pair in parse_link(key, names):
                rates[pair] = float(mbit)
        sweep = data.get("sweep", {})
        sweep_links = tuple(p for key in sweep.get("links", []) for p in parse_link(key, names))
        return cls(name, devices, rates, int(data.get("cpu_period_us", 5000)), sweep_links,
                   tuple(float(x) for x in sweep.get("mbit", [])), dict(data.get("workload", {})))


def parse_link(key: str, names: list[str]) -> list[tuple[str, str]]:
    """"a->b" (what a sends to b) or "a<->b" (both directions)."""
    both = "<->" in key
    a, b = (x.strip() for x in key.split("<->" if both else "->"))
    for n in (a, b):
        if n not in names:
            raise ValueError(f"link {key!r}: no device {n!r} (devices: {', '.join(names)})")
    return [(a, b), (b, a)] if both else [(a, b)]


def ip_of(index: int) -> str:
    return f"{SUBNET}.{index + 1}"


# ---------------------------------------------------------------- the shell side (root)

def sh(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def cannot_run() -> str | None:
    """Why a namespaced testbed cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc, cgroups)"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "needs iproute2 (ip, tc)"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "ip netns is not available here"
    if cgroup_kind() is None:
        return "no cpu cgroup controller (v1 /sys/fs/cgroup/cpu or v2 with cpu enabled)"
    return None


def cgroup_kind() -> str | None:
    if (CGROUP_V1 / "cpu.cfs_quota_us").exists():
        return "v1"
    controllers = CGROUP_V2 / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return "v2"
    return None


def cgroup_root() -> Path:
    return CGROUP_V1 if cgroup_kind() == "v1" else CGROUP_V2


def cgroup_path(tag: str, name: str) -> Path:
    # Flat, not nested under one parent: a parent group would weigh as a single process
    # against everything else on the machine, so all devices together would get one
    # process's share of a busy CPU and the quotas would never be what limits them.
    return cgroup_root() / f"{CGROUP_PREFIX}{tag}-{name}"


LEAST_QUOTA_US = 1000  # the kernel refuses a smaller CFS quota


def quota_us(cpus: float, period_us: int) -> int:
    """The quota a share gets per period. The kernel's least is 1 ms, so at the scenarios'
    5 ms period a share below 0.2 runs at 0.2 (`up` prints the share in effect)."""
    return max(LEAST_QUOTA_US, int(cpus * period_us))


def share_in_effect(cpus: float, period_us: int) -> float:
    """The CPUs a device with this share gets (more than ``cpus`` below the least quota)."""
    return quota_us(cpus, period_us) / period_us


def make_cgroup(path: Path, cpus: float, period_us: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    quota = quota_us(cpus, period_us)
    if cgroup_kind() == "v1":
        (path / "cpu.shares").write_text("1024")  # the weight of one ordinary process
        (path / "cpu.cfs_period_us").write_text(str(period_us))
        (path / "cpu.cfs_quota_us").write_text(str(quota))
    else:
        subtree = path.parent / "cgroup.subtree_control"
        if "cpu" not in subtree.read_text().split():
            subtree.write_text("+cpu")
        (path / "cpu.max").write_text(f"{quota} {period_us}")


def cpu_stat(path: Path) -> dict[str, int]:
    """The cgroup's cpu.stat (nr_periods, nr_throttled, throttled_time or throttled_usec)."""
    try:
        return {k: int(v) for k, v in (line.split() for line in (path / "cpu.stat").read_text().splitlines())}
    except OSError:
        return {}


def cgroup_pids(path: Path) -> list[int]:
    try:
        return [int(x) for x in (path / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def namespaces(prefix: str) -> list[str]:
    out = sh("ip", "netns", "list", check=False)
    return [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0].startswith(prefix)]


def class_id(index: int) -> str:
    return f"1:{10 + index}"


def shape_commands(ns: str, dev: str, to_index: int, mbit: float, change: bool) -> list[list[str]]:
    """A tbf under the htb class of one destination, and the route to it with the link's
    frame size. htb only classifies (its own buckets, even with a one-MTU burst, let 16 KiB
    through at once after a second of idle: measured 536 Mbit/s for a request on a 1 Mbit/s
    class); tbf paces every message at the rate. A new connection takes the route's MTU."""
    handle = f"{10 + to_index}:"
    return [["ip", "netns", "exec", ns, "tc", "qdisc", "change" if change else "add", "dev", dev,
             "parent", class_id(to_index), "handle", handle, "tbf", "rate", f"{mbit:g}mbit",
             "burst", str(tbf_burst(mbit)), "latency", TBF_LATENCY],
            ["ip", "-n", ns, "route", "replace", f"{ip_of(to_index)}/32", "dev", dev, "mtu", str(route_mtu(mbit))]]


class Homenet:
    """One scenario brought up under a tag. ``with Homenet(s).up() as net: ...`` tears down on exit."""

    def __init__(self, scenario: Scenario, tag: str | None = None, python: str = sys.executable,
                 probe_interval_s: float = PROBE_INTERVAL_S, tie_to_parent: bool = True,
                 log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> None:
        self.scenario = scenario
        self.tag = tag or scenario.name
        self.python = python
        self.probe_interval_s = probe_interval_s
        self.tie_to_parent = tie_to_parent  # peers die with this process (library use), not with `up`
        self.log = log
        self.procs: dict[str, subprocess.Popen] = {}
        self.peer_ids: dict[str, str] = {}

    # ------------------------------------------------------------ names

    def ns(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def cgroup(self, name: str) -> Path:
        return cgroup_path(self.tag, name)

    def ip(self, name: str) -> str:
        return ip_of(self.scenario.index(name))

    def state_file(self) -> Path:
        return STATE_DIR / f"{self.tag}.json"

    def work_dir(self) -> Path:
        """Logs of the peers and the source: kept after teardown, for the post-mortem."""
        return LOG_DIR / self.tag

    # ------------------------------------------------------------ up

    def __enter__(self) -> "Homenet":
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self, reprofile: bool = False) -> "Homenet":
        """Network, shaping, cgroups, then every peer but the source, joined; tears down on any failure."""
        self.start(reprofile)
        try:
            self.wait_joined()
        except BaseException:
            self.down()
            raise
        return self

    def start(self, reprofile: bool = False) -> "Homenet":
        """up() without waiting for the peers to join (they profile inside their quotas meanwhile:
        a source agent started now profiles beside them). Tears down on any failure."""
        reason = cannot_run()
        if reason:
            raise RuntimeError(f"homenet: {reason}")
        if namespaces(f"{self.tag}-"):
            raise RuntimeError(f"homenet {self.tag!r} is already up (python bootstrap/netns/homenet.py down {self.tag})")
        try:
            self.work_dir().mkdir(parents=True, exist_ok=True)
            self._save()
            self._network()
            for d in self.scenario.devices:
                make_cgroup(self.cgroup(d.name), d.cpus, self.scenario.cpu_period_us)
            self._spawn_peers(reprofile)
        except BaseException:
            self.down()
            raise
        return self

    def _network(self) -> None:
        hub = self.ns("hub")
        sh("ip", "netns", "add", hub)
        sh("ip", "-n", hub, "link", "set", "lo", "up")
        sh("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", hub, "link", "set", "br0", "up")
        names = self.scenario.names
        for k, name in enumerate(names):
            ns = self.ns(name)
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "link", "add", f"v{k}", "netns", ns, "type", "veth", "peer", "name", f"v{k}h", "netns", hub)
            sh("ip", "-n", ns, "addr", "add", f"{ip_of(k)}/24", "dev", f"v{k}")
            sh("ip", "-n", ns, "link", "set", f"v{k}", "mtu", str(MTU), "up")
            sh("ip", "-n", hub, "link", "set", f"v{k}h", "master", "br0")
            sh("ip", "-n", hub, "link", "set", f"v{k}h", "up")
            dev = f"v{k}"
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb",
               "default", "1")
            sh("ip", "netns", "exec", ns, "tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:1",
               "htb", "rate", UNSHAPED)
            for j, other in enumerate(names):
                if other == name:
                    continue
                sh("ip", "netns", "exec", ns, "tc", "class", "add", "dev", dev, "parent", "1:", "classid", class_id(j),
                   "htb", "rate", UNSHAPED)
                for cmd in shape_commands(ns, dev, j, self.scenario.rates[(name, other)], change=False):
                    sh(*cmd)
                sh("ip", "netns", "exec", ns, "tc", "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip",
                   "prio", "1", "u32", "match", "ip", "dst", f"{ip_of(j)}/32", "flowid", class_id(j))

    def shape(self, a: str, b: str, mbit: float) -> None:
        """Re-shape what a sends to b (takes effect at once; probes see it within an interval)."""
        k, j = self.scenario.index(a), self.scenario.index(b)
        for cmd in shape_commands(self.ns(a), f"v{k}", j, mbit, change=True):
            sh(*cmd)

    def cache_dir(self, name: str) -> Path:
        """The device's own cache root: its profile is measured inside its quota and kept for the
        next run of the same scenario; the converted model and the built kernels are shared
        (links: one machine, one build, not a compile inside every device's quota)."""
        from_env = os.environ.get("SWARM_CACHE_DIR")
        base = Path(from_env) if from_env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "swarm"
        spec = self.scenario.devices[self.scenario.index(name)]
        path = base / "homenet" / f"{self.scenario.name}-{name}-{spec.cpus:g}cpu-{self.scenario.cpu_period_us}us"
        path.mkdir(parents=True, exist_ok=True)
        for shared in ("models", "kernels"):
            link = path / shared
            if not link.exists():
                (base / shared).mkdir(parents=True, exist_ok=True)
                link.symlink_to((base / shared).resolve(), target_is_directory=True)
        return path

    def popen(self, name: str, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start a process in the device's namespace and CPU cgroup (one torch thread)."""
        procs = self.cgroup(name) / "cgroup.procs"
        tie = self.tie_to_parent

        def enter() -> None:  # runs in the child before exec: the cgroup, then die with the parent
            procs.write_text(str(os.getpid()))
            if tie:
                ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
               "SWARM_CACHE_DIR": str(self.cache_dir(name)), **kwargs.pop("env", {})}
        # nsenter, not `ip netns exec`: that one mounts a fresh /sys, without /sys/fs/cgroup, and
        # a device must see its CPU quota (swarm.runtime.hopcost prices its hops with it).
        return subprocess.Popen(["nsenter", f"--net=/run/netns/{self.ns(name)}", *argv], cwd=REPO, env=env,
                                preexec_fn=enter, start_new_session=True, **kwargs)

    def _spawn_peers(self, reprofile: bool) -> None:
        for d in self.scenario.devices:
            if reprofile:  # the source's too: it profiles itself when its agent starts
                shutil.rmtree(self.cache_dir(d.name) / "profiles", ignore_errors=True)
            if d.source:
                continue
            argv = [self.python, "-m", "swarm", "join", "--interface", self.ip(d.name), "--name", d.name,
                    "--threads", "1", "--heartbeat", str(HEARTBEAT_S), "--probe-interval", str(self.probe_interval_s)]
            if d.mem:
                argv += ["--mem", d.mem]
            log_file = open(self.work_dir() / f"{d.name}.log", "w")
            self.procs[d.name] = self.popen(d.name, argv, stdout=subprocess.PIPE, stderr=log_file, text=True)
            log_file.close()

    def wait_joined(self) -> None:
        """Until every started peer has joined (its profile measured, or read from its cache)."""
        began, waiting = time.monotonic(), {n: p for n, p in self.procs.items() if n not in self.peer_ids}
        while waiting:
            elapsed = time.monotonic() - began
            if elapsed > JOIN_TIMEOUT_S:
                raise RuntimeError(f"peers {sorted(waiting)} did not join within {JOIN_TIMEOUT_S:.0f} s")
            ready, _, _ = select.select([p.stdout for p in waiting.values()], [], [], 10.0)
            for name, proc in list(waiting.items()):
                if proc.stdout in ready:
                    line = proc.stdout.readline()
                    if not line:
                        tail = (self.work_dir() / f"{name}.log").read_text()[-2000:]
                        raise RuntimeError(f"peer {name} exited (code {proc.wait()}):\n{tail}")
                    self.peer_ids[name] = json.loads(line)["joined"]
                    del waiting[name]
                    self.log(f"  {name:6s} joined as {self.peer_ids[name]} after {elapsed:.0f} s")
            if waiting and not ready:
                self.log(f"  profiling inside their quotas: {', '.join(sorted(waiting))} ({elapsed:.0f} s)")
        self._save()

    def _save(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        state = {"scenario": self.scenario.name, "tag": self.tag,
                 "peers": {n: {"ip": self.ip(n), "peer_id": self.peer_ids.get(n),
                               "pid": p.pid if (p := self.procs.get(n)) else None} for n in self.scenario.names}}
        self.state_file().write_text(json.dumps(state, indent=1))

    # ------------------------------------------------------------ down

    def down(self) -> list[str]:
        for proc in self.procs.values():
            if proc.stdout:
                proc.stdout.close()
        removed = teardown(self.tag)
        for proc in self.procs.values():
            proc.poll()  # reap: killed above
        self.procs.clear()
        return removed


class SourceAgent:
    """bootstrap/netns/source_agent.py in the source's namespace and cgroup; JSON lines.

    Started, it profiles itself and waits for the scenario's peers; `peer_id` (or `ask`) waits
    until it is ready. Start it after `Homenet.up()` for profiles measured one device at a
    time, or after `Homenet.start()` to profile beside the peers (a test's shorter start)."""

    def __init__(self, net: "Homenet", log_path: Path) -> None:
        src = net.scenario.source
        peers = len(net.scenario.devices) - 1
        argv = [net.python, "bootstrap/netns/source_agent.py", net.ip(src.name), src.name, str(peers),
                str(net.probe_interval_s)]
        if src.mem:
            argv.append(str(parse_bytes(src.mem)))
        with open(log_path, "w") as err:
            self.proc = net.popen(src.name, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        self.log_path = log_path
        self._peer_id: str | None = None

    @property
    def peer_id(self) -> str:
        """The source's peer id, once it is ready (blocks until then)."""
        return self._wait_ready()

    def _wait_ready(self) -> str:
        if self._peer_id is None:  # the agent's first line says it is ready
            ready = self.proc.stdout.readline()
            if not ready:
                raise RuntimeError(f"the source agent exited:\n{self.log_path.read_text()[-3000:]}")
            self._peer_id = json.loads(ready)["ready"]
        return self._peer_id

    def ask(self, **req) -> dict:
        self._wait_ready()
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the source agent exited")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"source agent: {answer['error']}")
        return answer

    def close(self, timeout_s: float = 30.0) -> None:
        """End of input: the agent finishes what it runs, leaves the swarm and exits (killed
        after timeout_s; pass a short one when interrupted)."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


def parse_bytes(text: str) -> int:
    """'512M' -> bytes (as swarm join --mem reads it)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2) or "_"))


def teardown(tag: str) -> list[str]:
    """Remove everything of `tag`: processes, namespaces (their veths and qdiscs go with them),
    cgroups, state. Idempotent; returns what it removed."""
    removed = []
    groups = sorted(cgroup_root().glob(f"{CGROUP_PREFIX}{tag}-*")) if cgroup_kind() else []
    spaces = namespaces(f"{tag}-")
    pids = {pid for g in groups for pid in cgroup_pids(g)}
    for ns in spaces:
        pids.update(int(p) for p in sh("ip", "netns", "pids", ns, check=False).split())
    _stop(pids)
    for ns in spaces:
        sh("ip", "netns", "del", ns, check=False)
        removed.append(f"netns {ns}")
    for g in groups:
        for _ in range(50):
            try:
                g.rmdir()
                removed.append(f"cgroup {g}")
                break
            except OSError:  # a process still exiting
                _stop(set(cgroup_pids(g)))
                time.sleep(0.1)
    state = STATE_DIR / f"{tag}.json"
    if state.exists():
        state.unlink()
    return removed


def _stop(pids: set[int]) -> None:
    pids = {p for p in pids if p != os.getpid()}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_GRACE_S
        while pids and time.monotonic() < deadline:
            pids = {p for p in pids if _alive(p)}
            time.sleep(0.05)
        if not pids:
            return


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # our own children: reap
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of another parent counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def leftovers(tag: str) -> list[str]:
    """What of `tag` still exists (for tests): namespaces, cgroups, state."""
    found = [f"netns {ns}" for ns in namespaces(f"{tag}-")]
    if cgroup_kind():
        found += [f"cgroup {g}" for g in cgroup_root().glob(f"{CGROUP_PREFIX}{tag}-*")]
    if (STATE_DIR / f"{tag}.json").exists():
        found.append(f"state {STATE_DIR / f'{tag}.json'}")
    return found


# ---------------------------------------------------------------- the command line

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="homenet.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="bring a scenario up (peers keep running after this returns)")
    up.add_argument("scenario")
    up.add_argument("--tag", help="name prefix for namespaces and cgroups (default: the scenario's name)")
    up.add_argument("--reprofile", action="store_true", help="measure every device's profile again (the source's too)")
    down = sub.add_parser("down", help="tear a scenario down (idempotent)")
    down.add_argument("tag", nargs="?")
    down.add_argument("--all", action="store_true", help="every homenet this machine has up")
    shape = sub.add_parser("shape", help="re-shape what device A sends to device B")
    shape.add_argument("tag")
    shape.add_argument("a")
    shape.add_argument("b")
    shape.add_argument("mbit", type=float)
    status = sub.add_parser("status", help="what is up")
    status.add_argument("tag", nargs="?")
    args = p.parse_args(argv)

    def stop(signum, frame):  # Ctrl-C or kill during `up`: the except in up() tears down
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    if args.cmd == "up":
        net = Homenet(Scenario.load(args.scenario), args.tag, tie_to_parent=False)
        print(f"bringing up {net.scenario.name} as {net.tag} ...", file=sys.stderr)
        try:
            net.up(reprofile=args.reprofile)
        except KeyboardInterrupt:
            print("interrupted: everything torn down", file=sys.stderr)
            return 130
        for d in net.scenario.devices:
            role = "source (start yours here)" if d.source else f"peer {net.peer_ids[d.name]}"
            effect = share_in_effect(d.cpus, net.scenario.cpu_period_us)
            share = f"{d.cpus:.2f} cpu" + (f" ({effect:.2f} in effect)" if effect > d.cpus else "")
            print(f"{d.name:6s} ns {net.ns(d.name):14s} {net.ip(d.name):12s} {share}  {role}")
        print(f"down with: python bootstrap/netns/homenet.py down {net.tag}", file=sys.stderr)
        return 0
    if args.cmd == "down":
        tags = _tags() if args.all else [args.tag or ""]
        if tags == [""]:
            p.error("down needs a tag or --all")
        for tag in tags:
            removed = teardown(tag)
            print(f"{tag}: removed {len(removed)} ({', '.join(removed) or 'nothing was up'})")
        return 0
    if args.cmd == "shape":
        state = json.loads((STATE_DIR / f"{args.tag}.json").read_text())
        Homenet(Scenario.load(state["scenario"]), args.tag).shape(args.a, args.b, args.mbit)
        return 0
    for tag in [args.tag] if args.tag else _tags():
        print(tag, json.dumps(json.loads((STATE_DIR / f"{tag}.json").read_text()) if (STATE_DIR / f"{tag}.json").exists()
                              else {}), leftovers(tag))
    return 0


def _tags() -> list[str]:
    return sorted(p.stem for p in STATE_DIR.glob("*.json")) if STATE_DIR.exists() else []


if __name__ == "__main__":
    sys.exit(main())
