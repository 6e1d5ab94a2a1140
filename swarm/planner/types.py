"""Device types: interchangeable devices collapse, so subsets become count vectors.

Two devices are interchangeable when they have the same memory, the same per-unit
times and the same links to every other type. A plan then only needs to know how
many devices of each type it uses and which type ran last: with the paper's testbed
(source AGX, 11 AGX, 2 NX, 1 RTX 3090 on one network) 144 states replace 32,768 subsets.
With every device distinct this is the plain subset DP (one type per device).

The source is always type 0 with count 1 and is always in the plan, so a state is the
count vector of the other types in mixed radix; state 0 = the source alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable

import numpy as np

from swarm.planner.problem import Problem


@dataclass(frozen=True, eq=False)
class TypeSpace:
    members: tuple[tuple[int, ...], ...]  # devices of each type; members[0] == (source,)
    counts: np.ndarray  # [T]
    strides: np.ndarray  # [T]; strides[0] = 0, the source is never added
    digits: np.ndarray  # [n_states, T] count of each type in each state (digits[:, 0] = 1)
    layers: tuple[np.ndarray, ...]  # state indices by number of non-source devices

    @property
    def n_types(self) -> int:
        return len(self.members)

    @property
    def n_states(self) -> int:
        return len(self.digits)

    @property
    def reps(self) -> list[int]:
        return [m[0] for m in self.members]

    def pair(self, u: int, v: int) -> tuple[int, int] | None:
        """A representative link from a device of type u to a different device of type v."""
        for i in self.members[u]:
            for j in self.members[v]:
                if i != j:
                    return i, j
        return None


def state_count(counts: list[int]) -> int:
    n = 1
    for c in counts[1:]:
        n *= c + 1
    return n


def build_space(members: list[tuple[int, ...]]) -> TypeSpace:
    counts = np.array([len(m) for m in members], dtype=np.int64)
    strides = np.zeros(len(members), dtype=np.int64)
    s = 1
    for t in range(1, len(members)):
        strides[t] = s
        s *= counts[t] + 1
    idx = np.arange(s, dtype=np.int64)
    digits = np.ones((s, len(members)), dtype=np.int64)
    for t in range(1, len(members)):
        digits[:, t] = (idx // strides[t]) % (counts[t] + 1)
    total = digits[:, 1:].sum(axis=1)
    layers = tuple(np.nonzero(total == k)[0] for k in range(int(counts[1:].sum()) + 1))
    return TypeSpace(tuple(members), counts, strides, digits, layers)


def group_devices(problem: Problem, key: Callable[[int], Hashable]) -> list[tuple[int, ...]]:
    """Group devices by key (source alone first), then keep the grouping only if links agree.

    Links must be equal within every (type, type) block, off the diagonal of devices; groups are
    split by their links to the other groups until they are, and if that does not settle, every
    device becomes its own type (exact either way, only slower).
    """
    src = problem.source
    label = {d: ("source",) if d == src else ("device", key(d)) for d in range(problem.n_devices)}
    for _ in range(problem.n_devices):  # refine by links to each class until stable
        members = _classes(label, src)
        if _links_agree(problem, members):
            return members
        new = {d: (label[d], tuple(sorted(
            (label[j], problem.bandwidth[d, j], problem.latency[d, j], problem.bandwidth[j, d], problem.latency[j, d])
            for j in range(problem.n_devices) if j != d))) for d in label}
        if len(set(new.values())) == len(set(label.values())):
            break
        label = new
    return [(src,)] + [(d,) for d in range(problem.n_devices) if d != src]


def _classes(label: dict[int, Hashable], src: int) -> list[tuple[int, ...]]:
    groups: dict[Hashable, list[int]] = {}
    for d, lab in label.items():
        if d != src:
            groups.setdefault(lab, []).append(d)
    return [(src,)] + [tuple(g) for g in groups.values()]


def _links_agree(problem: Problem, members: list[tuple[int, ...]]) -> bool:
    for a in members:
        for b in members:
            vals = {(problem.bandwidth[i, j], problem.latency[i, j]) for i in a for j in b if i != j}
            if len(vals) > 1:
                return False
    return True


def device_type_key(problem: Problem) -> Callable[[int], Hashable]:
    """Devices with equal memory, per-unit times and fixed per-step costs are interchangeable in the generic DP."""
    return lambda d: (float(problem.device_mem[d]), problem.time[d].tobytes(),
                      float(problem.step_overhead[d]), float(problem.hop_overhead[d]))


def assign_devices(space: TypeSpace, type_path: list[int]) -> list[int]:
    """Concrete distinct devices for a sequence of types (the order within a type is free)."""
    used = {t: 0 for t in range(space.n_types)}
    out = []
    for t in type_path:
        out.append(space.members[t][used[t]])
        used[t] += 1
    return out
