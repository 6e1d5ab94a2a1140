"""Link measurement: probe sizes and the bandwidth slope (links.py), and when the prober refreshes."""

from types import SimpleNamespace

from swarm.discovery.links import ProbeConfig, link_from_timings, probe_sizes
from swarm.discovery.prober import LinkProber
from swarm.discovery.txt import Link


def test_bandwidth_slope_cancels_round_trip_and_burst():
    rate, burst, rtt = 1.25e6, 16_000, 0.004
    small, large = probe_sizes(2_000, ProbeConfig(min_bytes=40_000))
    assert (small, large) == (40_000, 160_000)
    # the first round drains the burst; later rounds pay the full rate
    def times(size):
        return [rtt + (size - burst) / rate] + [rtt + size / rate] * 3
    link = link_from_timings([rtt, rtt * 1.5], (small, times(small)), (large, times(large)))
    assert abs(link.bandwidth - rate) / rate < 1e-9 and link.rtt == rtt
    # other traffic delaying every small probe must not inflate the slope
    delayed = [t + 0.02 for t in times(small)]
    link = link_from_timings([rtt], (small, delayed), (large, times(large)))
    assert abs(link.bandwidth - rate) / rate < 1e-9


def test_a_refresh_keeps_its_probes_within_a_slow_links_time_budget():
    config = ProbeConfig(min_bytes=16_384, max_bytes=16_384)
    assert probe_sizes(2_304, config) == (16_384, 65_536)  # first measurement: the configured sizes
    assert probe_sizes(2_304, config, known_bandwidth=6.25e6) == (16_384, 65_536)  # 50 Mbit/s: within 50 ms already
    small, large = probe_sizes(2_304, config, known_bandwidth=125_000)  # 1 Mbit/s
    assert (small, large) == (config.floor_bytes, 4 * config.floor_bytes)
    assert large / 125_000 < 0.15  # was 0.52 s a payload, 2 s a direction with three rounds
    small, large = probe_sizes(2_304, config, known_bandwidth=1.25e6)  # 10 Mbit/s: large = 50 ms of the link
    assert large == 4 * (int(1.25e6 * config.link_time_s) // 4)


def test_a_paused_prober_waits_to_refresh_measured_links_but_measures_new_ones():
    prober = LinkProber(SimpleNamespace(live={}), 2_304, ProbeConfig(max_defer=2))
    prober.links["known"] = Link(bandwidth=1e6, rtt=1e-3)
    with prober.paused():
        assert all(prober._defer("known") for _ in range(10))  # beyond max_defer: paused has no bound
        assert not prober._defer("new")  # never measured: measured at once
    assert not prober._defer("known")  # not busy, not paused: refreshed when due
