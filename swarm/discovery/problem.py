"""The planner's problem (the JSON `swarm plan` reads) built from live announcements. Pure.

Device 0 is the source, from its own profile: it holds unit 0, and its profile also
gives the units' sizes (every peer in the problem has the same model fingerprint,
so the same units). Other devices come from their announcements, or from the full
profile fetched over INFO when the announcement only carried a summary.

A link measured in one direction only is assumed symmetric; two peers that never
measured each other get bandwidth 0 (no link), which the planner will not use.
"""

from __future__ import annotations

from dataclasses import dataclass

from swarm.discovery.txt import Announcement, Link

RETURN_BYTES_PER_SEQUENCE = 8  # one int64 token id per sequence goes back to the source


@dataclass(frozen=True)
class Workload:
    """What the plan must hold and carry: m micro-batches of b sequences, each with a KV
    slot of `context` positions on every stage; a decode step moves one token per
    sequence of a micro-batch across each cut and returns b token ids."""

    micro_batches: int = 1
    batch_size: int = 1
    context: int = 512

    @property
    def slots(self) -> int:
        return self.micro_batches * self.batch_size


@dataclass(frozen=True)
class Device:
    peer_id: str
    name: str
    mem_bytes: int
    times: tuple[float, ...]  # seconds per unit for one decode token: what the planner uses
    prefill_times: tuple[float, ...] = ()  # seconds per unit for the profile's prompt (first token only)
    step_overhead: float = 0.0  # seconds per step of any stage (issue 26)
    hop_overhead: float = 0.0  # seconds per step of a stage in a multi-stage plan (issue 26)


def device_from_profile(profile: dict, peer_id: str, name: str, mem_bytes: int | None = None,
                        hop_overhead: float = 0.0) -> Device:
    mem = profile["device"]["mem_bytes"] if mem_bytes is None else mem_bytes
    return Device(peer_id, name, int(mem), tuple(float(u["decode_s"]) for u in profile["units"]),
                  tuple(float(u["prefill_s"]) for u in profile["units"]),
                  float(profile.get("step_decode_s", 0.0)), float(hop_overhead))


def device_for_model(peer_profile: dict, model_profile: dict, peer_id: str, name: str, mem_bytes: int,
                     hop_overhead: float = 0.0) -> Device:
    """A peer that profiled another model (an open peer, `swarm join` without --model), with
    times for this one: its measured seconds per weight byte over its decoder blocks, times
    each of this model's units' bytes (decode streams the weights: its time follows their size).
    Its per-step constant and hop overhead are its own, whatever the model."""
    blocks = peer_profile["units"][1:-1] or peer_profile["units"]
    weight = sum(u["weight_bytes"] for u in blocks)

    def per_byte(key: str) -> float:
        return sum(float(u[key]) for u in blocks) / weight if weight else 0.0

    decode, prefill = per_byte("decode_s"), per_byte("prefill_s")
    units = model_profile["units"]
    return Device(peer_id, name, int(mem_bytes), tuple(decode * u["weight_bytes"] for u in units),
                  tuple(prefill * u["weight_bytes"] for u in units), float(peer_profile.get("step_decode_s", 0.0)),
                  float(hop_overhead))


def device_from_announcement(a: Announcement) -> Device:
    times = a.unit_times()
    if times is None:
        raise ValueError(f"peer {a.peer_id} announced a summary only; fetch its profile over INFO")
    return Device(a.peer_id, a.name, a.mem_bytes, tuple(times), tuple(a.prefill_times()),
                  a.step_overhead_us / 1e6, a.hop_overhead_us / 1e6)


def build_problem(source_profile: dict, devices: list[Device], links: dict[tuple[str, str], Link],
                  workload: Workload = Workload()) -> dict:
    """Planner problem JSON. devices[0] is the source; links maps (from id, to id) to
    what was measured. Unit times are decode times (R is the per-token latency); each device
    also carries its prefill times for "prefill_tokens" tokens (``first_token_s``) and its fixed
    per-step costs. Extra field "peer_ids" maps device indices back to peers."""
    units = source_profile["units"]
    ids = [d.peer_id for d in devices]
    bandwidth, latency = link_matrices(ids, links)
    kv_tokens = workload.slots * workload.context
    return {
        "source": 0,
        "layers": [{"name": u["name"],
                    "mem": u["weight_bytes"] + u["kv_bytes_per_token"] * kv_tokens,
                    "out": u["out_bytes_per_token"] * workload.batch_size}
                   for u in units],
        "devices": [{"name": d.name, "mem": d.mem_bytes, "time": list(d.times), "prefill_time": list(d.prefill_times),
                     "step_overhead": d.step_overhead, "hop_overhead": d.hop_overhead} for d in devices],
        "prefill_tokens": int(source_profile.get("prefill_tokens", 32)),
        "bandwidth": bandwidth,
        "latency": latency,
        "return_bytes": RETURN_BYTES_PER_SEQUENCE * workload.batch_size,
        "peer_ids": ids,
    }


def link_matrices(ids: list[str], links: dict[tuple[str, str], Link]) -> tuple[list[list[float]], list[list[float]]]:
    """bandwidth [M][M] bytes/s and one-way latency [M][M] s (half the round trip)."""
    m = len(ids)
    bw = [[0.0] * m for _ in range(m)]
    lat = [[0.0] * m for _ in range(m)]
    for i, u in enumerate(ids):
        for j, v in enumerate(ids):
            if i == j:
                continue
            link = links.get((u, v)) or links.get((v, u))
            if link is not None:
                bw[i][j], lat[i][j] = link.bandwidth, link.rtt / 2
    return bw, lat


def links_from_announcements(announcements: list[Announcement]) -> dict[tuple[str, str], Link]:
    return {(a.peer_id, other): link for a in announcements for other, link in a.links.items()}


def predicted_step_costs(problem: dict, stages, widths: int) -> tuple[float, ...]:
    """What a step of width 1 .. ``widths`` costs over ``stages`` relative to a plain (width 1)
    one, by ``predicted_first_token_s``'s line: a speculative verify step of k drafts is a step
    of width k + 1, not k + 1 decode steps (swarm.runtime.speculate.best_draft weighs it)."""
    one = predicted_first_token_s(problem, stages, 1)
    return tuple(predicted_first_token_s(problem, stages, w) / one for w in range(1, widths + 1))


def predicted_first_token_s(problem: dict, stages, prompt_tokens: int) -> float:
    """The planner's figure for the first token of a prompt of ``prompt_tokens`` tokens over
    ``stages`` (planner stages of ``problem``): each stage's prefill, its fixed per-step costs,
    the hops carrying the prompt's activations, and the return of the token. Later tokens
    cost the plan's latency_s (decode times).

    A stage's prefill of n tokens runs on the line through its decode time (one token) and
    its profiled prefill time ("prefill_tokens" tokens): on a CPU a short prompt costs about
    a decode step, since reading the weights, not the tokens, takes the time."""
    from swarm.planner.problem import Problem

    p = Problem.from_json(problem)
    profiled = max(2, int(problem.get("prefill_tokens", 32)))
    share = (prompt_tokens - 1) / (profiled - 1)
    fixed = p.stage_overhead() if len(stages) > 1 else p.step_overhead
    total = float(p.return_time()[stages[-1].device])
    for k, s in enumerate(stages):
        decode = float(p.time[s.device, s.start:s.end].sum())
        prefill = problem["devices"][s.device].get("prefill_time")
        prefill = sum(prefill[s.start:s.end]) if prefill else decode * profiled
        total += max(decode, decode + (prefill - decode) * share) + float(fixed[s.device])
        if k + 1 < len(stages):
            total += float(p.hop_time(p.layer_out[s.end - 1] * prompt_tokens)[s.device, stages[k + 1].device])
    return total
