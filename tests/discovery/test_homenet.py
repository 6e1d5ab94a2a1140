"""The emulated home network (bootstrap/netns/homenet.py) with the default model: the
`trio` scenario comes up (namespaces, shaped links, CPU quotas, peers profiling
themselves), the source's plan runs through the real swarm with transformers' tokens,
a link is re-shaped and the source re-plans to what the planner predicts for the
links as measured, and teardown leaves nothing behind."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from bootstrap.netns.homenet import Homenet, Scenario, SourceAgent, cannot_run, leftovers, namespaces
from swarm.model import hf
from swarm.planner.api import plan_ours
from swarm.planner.problem import Problem
from tests.model.reference import reference_generate

pytestmark = [pytest.mark.netns, pytest.mark.slow]

MBIT = 1e6 / 8
SLOW_MBIT = 0.2  # what the source sends to its first peer, afterwards
PROBE_INTERVAL_S = 4.0
LINK_TIMEOUT_S = 120.0
NEW_TOKENS = 12
TEXT = "The capital of France is"


def _measured(agent: SourceAgent, ids_by_name: dict[str, str]) -> tuple[dict, list[str]]:
    data = agent.ask(op="problem")["problem"]
    names = {pid: n for n, pid in ids_by_name.items()}
    return data, [names[pid] for pid in data["peer_ids"]]


def test_trio_runs_exact_tokens_replans_on_a_slowed_link_and_leaves_nothing(smollm2_dir, tmp_path):
    reason = cannot_run()
    if reason:
        pytest.skip(reason)
    tag = f"hn{os.getpid() % 100000}"
    net = Homenet(Scenario.load("trio"), tag, python=sys.executable, probe_interval_s=PROBE_INTERVAL_S,
                  log=lambda msg: None)
    agent = None
    try:
        net.up()
        assert sorted(namespaces(f"{tag}-")) == sorted(f"{tag}-{n}" for n in ("hub", "src", "a", "b"))
        agent = SourceAgent(net, tmp_path / "source.log")
        ids = {**net.peer_ids, "src": agent.peer_id}
        names = {pid: n for n, pid in ids.items()}
        prompt = hf.load_tokenizer(smollm2_dir)(TEXT)["input_ids"]
        expected = reference_generate(smollm2_dir, [prompt], NEW_TOKENS)[0]

        first = agent.ask(op="generate", prompt=prompt, new_tokens=NEW_TOKENS)
        assert first["tokens"] == expected
        before = [(names[pid], a, b) for pid, a, b in first["stages"]]
        assert before[0][0] == "src" and len(before) > 1, before  # the slow source offloads
        offloaded_to = before[1][0]

        # Slow what the source sends to the peer it offloads to. Once the probes measured it
        # (their figure is the best of the last few, so it takes some intervals), the planner,
        # given the links as measured, picks another plan: the source must deploy exactly that.
        data, order = _measured(agent, ids)
        fast = data["bandwidth"][order.index("src")][order.index(offloaded_to)] / MBIT
        net.shape("src", offloaded_to, SLOW_MBIT)
        deadline = time.monotonic() + LINK_TIMEOUT_S
        while True:
            data, order = _measured(agent, ids)
            got = data["bandwidth"][order.index("src")][order.index(offloaded_to)] / MBIT
            predicted = plan_ours(Problem.from_json(data), "latency")
            predicted_names = [(order[s.device], s.start, s.end) for s in predicted.stages]
            if predicted_names != before or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        assert got < fast / 4, f"src->{offloaded_to} measures {got:.2f} Mbit/s after shaping to {SLOW_MBIT}"
        assert predicted_names != before, f"the planner keeps {before} with src->{offloaded_to} at {got:.2f} Mbit/s"

        second = agent.ask(op="generate", prompt=prompt, new_tokens=NEW_TOKENS)
        after = [(names[pid], a, b) for pid, a, b in second["stages"]]
        # A probe may land between our question and the source's own re-plan: its plan must be
        # the planner's answer for the links as measured just before or just after it.
        data, order = _measured(agent, ids)
        predicted_later = [(order[s.device], s.start, s.end) for s in plan_ours(Problem.from_json(data), "latency").stages]
        assert after != before and after in (predicted_names, predicted_later), (before, after, predicted_names)
        assert second["tokens"] == expected  # the new plan computes the same tokens
    finally:
        if agent is not None:
            agent.close()
        net.down()
    assert leftovers(tag) == []
    assert not [p for p in Path("/sys/fs/cgroup/cpu").glob(f"*{tag}*")]
