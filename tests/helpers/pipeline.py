"""A plan written by hand over local peers and a PipelineConfig for it (the engine, fuzz,
flood, stranger and capture tests share them)."""

from __future__ import annotations

from swarm.model.local import even_cuts
from swarm.runtime.deploy import StagePlacement as Stage
from swarm.runtime.engine import PipelineConfig
from swarm.runtime.schedule import Layout, Mode

TINY_UNITS = 6  # embedding + 4 blocks + norm/head
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11], [20], [30, 31, 32], [40, 41, 42, 43]]
NEW = 12
TIMEOUT_S = 60


def plan_for(peers: list[str], n_peers: int, num_units: int = TINY_UNITS) -> tuple[Stage, ...]:
    cuts = even_cuts(num_units, n_peers + 1)
    return tuple(Stage(addr, a, b) for addr, (a, b) in zip([None, *peers[:n_peers]], cuts))


def config(model_dir, plan, m=1, b=1, mode=Mode.NO_BUBBLES, max_len=128):
    return PipelineConfig(model_dir, plan, layout=Layout(m, b), mode=mode, max_len=max_len)
