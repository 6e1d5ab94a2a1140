from swarm.discovery.liveness import Liveness, LivenessConfig
from swarm.discovery.problem import (Workload, build_problem, device_from_announcement, device_from_profile,
                                     links_from_announcements, predicted_first_token_s)
from swarm.discovery.txt import Link, decode, encode, from_profile
from swarm.planner.problem import Problem
from tests.helpers.discovery import fixture_profile


def test_problem_from_announcements_matches_profiles_and_links():
    profiles = [fixture_profile(block_decode_s=0.001 * (k + 1), mem_bytes=(k + 1) << 30) for k in range(3)]
    ids = ["aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc"]
    peers = [decode(encode(from_profile(p, pid, f"dev{k}", links={ids[0]: Link(1e6 * (k + 1), 0.002)})))
             for k, (p, pid) in enumerate(zip(profiles[1:], ids[1:]))]
    source_links = {(ids[0], ids[1]): Link(5e6, 0.001)}
    devices = [device_from_profile(profiles[0], ids[0], "source")] + [device_from_announcement(a) for a in peers]
    w = Workload(micro_batches=1, batch_size=2, context=100)
    data = build_problem(profiles[0], devices, {**links_from_announcements(peers), **source_links}, w)
    problem = Problem.from_json(data)  # the planner accepts it
    assert data["peer_ids"] == ids
    for k, dev in enumerate(data["devices"]):
        assert dev["mem"] == profiles[k]["device"]["mem_bytes"]
        # decode times: a plan's R is the per-token latency (prefill only for the first token)
        assert max(abs(t - u["decode_s"]) for t, u in zip(dev["time"], profiles[k]["units"])) <= 1e-6
        assert max(abs(t - u["prefill_s"]) for t, u in zip(dev["prefill_time"], profiles[k]["units"])) <= 1e-6
    u = profiles[0]["units"][1]
    assert data["layers"][1]["mem"] == u["weight_bytes"] + u["kv_bytes_per_token"] * 200
    assert data["layers"][1]["out"] == u["out_bytes_per_token"] * 2
    # measured both ways -> each direction its own; one way only -> assumed symmetric; never -> no link
    assert problem.bandwidth[0, 1] == 5e6 and problem.bandwidth[1, 0] == 1e6
    assert problem.bandwidth[2, 0] == 2e6 and problem.bandwidth[0, 2] == 2e6
    assert problem.bandwidth[1, 2] == 0 and abs(problem.latency[2, 0] - 0.001) < 1e-9


def test_fixed_costs_travel_from_profile_and_announcement_to_the_problem():
    """Issue 26: a peer's step constant (its profile) and hop overhead (measured on its data
    path) are announced ("so", "ho") and reach the planner; records without them read as 0."""
    src, peer = fixture_profile(), {**fixture_profile(name="peer"), "step_decode_s": 0.0004}
    a = decode(encode(from_profile(peer, "bbbbbbbbbbbb", "peer", hop_overhead_s=0.00123)))
    assert (a.step_overhead_us, a.hop_overhead_us) == (400, 1230)
    old = {k: v for k, v in encode(from_profile(peer, "bbbbbbbbbbbb", "peer")).items() if k not in ("so", "ho")}
    assert (decode(old).step_overhead_us, decode(old).hop_overhead_us) == (0, 0)
    devices = [device_from_profile(src, "aaaaaaaaaaaa", "source", hop_overhead=0.0005), device_from_announcement(a)]
    links = {("aaaaaaaaaaaa", "bbbbbbbbbbbb"): Link(1e6, 0.002)}
    data = build_problem(src, devices, links)
    problem = Problem.from_json(data)
    assert problem.hop_overhead.tolist() == [0.0005, 0.00123]
    assert problem.step_overhead.tolist() == [0.0, 0.0004]

    class S:  # a planner stage
        def __init__(self, device, start, end):
            self.device, self.start, self.end = device, start, end

    stages = [S(0, 0, 3), S(1, 3, 6)]
    out = data["layers"][2]["out"]
    def prefill(units, n):  # on the line through decode (1 token) and the profiled prefill (32)
        d, p = sum(u["decode_s"] for u in units), sum(u["prefill_s"] for u in units)
        return d + (p - d) * (n - 1) / 31

    want = (prefill(src["units"][:3], 64) + 0.0005
            + 0.001 + 64 * out / 1e6  # the prompt's activations over the link (one-way latency = rtt / 2)
            + prefill(peer["units"][3:], 64) + 0.0004 + 0.00123
            + 0.001 + 8 / 1e6)  # the token back
    assert abs(predicted_first_token_s(data, stages, 64) - want) < 5e-6  # announced times are whole microseconds
    one = sum(u["decode_s"] for u in src["units"])
    assert abs(predicted_first_token_s(data, [S(0, 0, 6)], 1) - one) < 1e-9  # one token: a decode step


def test_liveness_drops_after_consecutive_misses_only():
    live = Liveness(LivenessConfig(misses=3))
    assert not live.missed("p") and not live.missed("p")
    live.answered("p")
    assert not live.missed("p") and not live.missed("p") and live.missed("p")


def test_a_peer_restarted_on_the_same_port_replaces_its_old_record():
    from swarm.discovery.directory import freshest
    from swarm.discovery.mdns import PeerRecord

    def rec(pid, port, seq=0):
        return PeerRecord(from_profile(fixture_profile(), pid, pid, seq=seq), "127.0.0.1", port)

    heard = [(rec("old", 5000), 1.0), (rec("new", 5000), 2.0),  # same port, restarted: new id heard later
             (rec("b", 5001, seq=1), 1.5), (rec("b", 5001, seq=2), 1.2)]  # one peer, two announcements
    out = freshest(heard)
    assert set(out) == {"new", "b"}
    assert out["b"].announcement.seq == 2


def test_a_wider_step_costs_what_the_prefill_line_says_not_width_decode_steps():
    """Speculative decoding (issue 23): a verify step of k drafts is one step of width k + 1."""
    from swarm.discovery.problem import predicted_step_costs

    src, peer = fixture_profile(), fixture_profile(name="peer")
    devices = [device_from_profile(src, "aaaaaaaaaaaa", "source"),
               device_from_announcement(decode(encode(from_profile(peer, "bbbbbbbbbbbb", "peer"))))]
    data = build_problem(src, devices, {("aaaaaaaaaaaa", "bbbbbbbbbbbb"): Link(1e6, 0.002)})

    class S:  # a planner stage
        def __init__(self, device, start, end):
            self.device, self.start, self.end = device, start, end

    stages = [S(0, 0, 3), S(1, 3, 6)]
    costs = predicted_step_costs(data, stages, 5)
    one = predicted_first_token_s(data, stages, 1)
    assert costs[0] == 1.0 and list(costs) == sorted(costs) and costs[4] < 5.0  # less than five steps
    for w in range(1, 6):
        assert abs(costs[w - 1] - predicted_first_token_s(data, stages, w) / one) < 1e-12
