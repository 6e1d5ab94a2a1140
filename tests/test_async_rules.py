"""Rules for awaiting, checked over the whole tree (see swarm/aio.py for why).

- nothing calls ``asyncio.wait_for``: on Python 3.11 it swallows a cancellation that
  coincides with its result, and a loop built on it outlives its TaskGroup (the
  suite hung that way); bound waits with ``asyncio.timeout`` or ``swarm.aio``;
- nothing calls ``asyncio.ensure_future``: a task is made with ``create_task`` by an
  owner that ends it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BANNED = {"wait_for": "asyncio.timeout or swarm.aio.bounded / wait_event",
          "ensure_future": "create_task by an owner that ends the task"}


def offences(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in BANNED and \
                isinstance(node.value, ast.Name) and node.value.id == "asyncio":
            found.append(f"asyncio.{node.attr} line {node.lineno}: use {BANNED[node.attr]}")
        elif isinstance(node, ast.ImportFrom) and node.module == "asyncio":
            found += [f"from asyncio import {a.name} line {node.lineno}" for a in node.names if a.name in BANNED]
    return found


def test_offences_are_found():
    code = "import asyncio\nfrom asyncio import wait_for\nasyncio.wait_for(x, 1)\nasyncio.ensure_future(y)\n"
    assert len(offences(ast.parse(code))) == 3


def test_no_wait_for_and_no_unowned_futures_anywhere():
    found = {}
    for folder in ("swarm", "tests", "benchmarks", "bootstrap"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.resolve() == Path(__file__).resolve():
                continue
            if hits := offences(ast.parse(path.read_text())):
                found[path.relative_to(ROOT).as_posix()] = hits
    assert found == {}
