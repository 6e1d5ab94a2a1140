"""The paper's testbed as problems: shapes, sizes and the roofline's calibration point."""

from __future__ import annotations

import pytest

from swarm.planner import plan
from swarm.planner.roofline import MEM_EFFICIENCY, load_testbed, unit_times
from swarm.planner.roofline import testbed as paper_problem


def test_llama2_sizes_and_the_edge_solo_calibration():
    tb = load_testbed()
    m7 = tb.models["llama2-7b"]
    assert m7.n_units == 34 and tb.models["llama2-70b"].n_units == 82
    assert m7.weight_bytes == pytest.approx(26.95e9, rel=0.01)  # 6.74 B parameters in fp32
    agx = tb.devices["agx-orin-32gb"]
    per_token = sum(unit_times(agx, m7, b=1, new_tokens=1, context=0))
    assert per_token == pytest.approx(m7.weight_bytes / (204.8e9 * MEM_EFFICIENCY), rel=0.03)
    assert per_token == pytest.approx(0.14034, rel=0.03)  # the paper's Edge-Solo 140.34 ms


def test_testbed_problem_matches_the_paper_setup():
    p = paper_problem("llama2-7b")
    kinds = [d.split("-")[0] for d in p.device_names]
    assert p.n_devices == 15 and kinds.count("agx") == 12 and kinds.count("orin") == 2
    cloud = p.device_names.index("rtx-3090-14")
    assert p.bandwidth[0, cloud] == p.bandwidth[cloud, 0] == 1e6 / 8  # 1 Mb/s source-cloud
    others = [p.bandwidth[i, j] for i in range(15) for j in range(15) if i != j and {i, j} != {0, cloud}]
    assert 40e6 / 8 <= min(others) and max(others) <= 60e6 / 8  # 50 Mb/s +- 20%
    # 1 Mb/s makes the cloud useless for the 2-device baseline: Cloud-Edge-Opt = Edge-Solo (as in the paper)
    assert plan(p, strategy="cloud-edge-opt").stages == plan(p, strategy="edge-solo").stages
    assert len(plan(paper_problem("llama2-70b")).stages) >= 9  # 276 GB needs many devices
