"""The CPU quota a testbed device gets (bootstrap/netns/homenet.py), without namespaces or root."""

from bootstrap.netns.homenet import LEAST_QUOTA_US, Scenario, quota_us, share_in_effect


def test_a_share_gets_its_quota_down_to_the_kernels_least():
    assert quota_us(0.25, 5000) == 1250
    assert quota_us(0.4, 5000) == 2000
    assert quota_us(0.12, 5000) == LEAST_QUOTA_US == 1000  # 0.2 of a CPU in effect, not 0.12
    assert quota_us(0.12, 10000) == 1200


def test_which_scenario_devices_run_above_their_share():
    home = Scenario.load("home")
    above = {d.name: share_in_effect(d.cpus, home.cpu_period_us) for d in home.devices
             if share_in_effect(d.cpus, home.cpu_period_us) > d.cpus}
    assert above == {"nx": 0.2}  # docs/testbed.md: the NX-like board runs at 0.2, not 0.12
