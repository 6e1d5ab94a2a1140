"""The layering written in docs/architecture.md, checked.

- swarm.planner and swarm.view pull in neither torch nor zmq nor transformers;
- only swarm/model/hf.py imports transformers;
- only swarm/cli touches the terminal (print, input, stdin/stdout, signals);
- nothing imports pickle (the wire format is msgpack + raw buffers);
- the source side (swarm/source.py, swarm/runtime, swarm/discovery) imports neither the
  views (swarm.view, swarm.cli) nor rich: the views read ``SwarmSource.state()``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "swarm"
HEAVY = ("torch", "zmq", "transformers")


def modules_under(folder: str) -> list[str]:
    return sorted(
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for p in (PACKAGE / folder).rglob("*.py")
    )


def loaded_after_import(module: str) -> set[str]:
    code = f"import sys, json, {module}; print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(json.loads(out))


@pytest.mark.parametrize("module", modules_under("planner") + modules_under("view"))
def test_pure_layers_stay_light(module):
    heavy = loaded_after_import(module) & set(HEAVY)
    assert not heavy, f"{module} pulls in {sorted(heavy)}"


def python_files():
    return sorted(PACKAGE.rglob("*.py"))


def imported_roots(tree: ast.AST) -> set[str]:
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_only_the_hf_module_imports_transformers():
    importers = [p.relative_to(PACKAGE.parent).as_posix() for p in python_files()
                 if "transformers" in imported_roots(ast.parse(p.read_text()))]
    assert importers == ["swarm/model/hf.py"]


def test_nothing_uses_pickle():
    users = [p.name for p in python_files() if imported_roots(ast.parse(p.read_text())) & {"pickle", "cloudpickle", "dill"}]
    assert users == []


def terminal_uses(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("print", "input"):
            found.append(f"{node.func.id}() line {node.lineno}")
        if isinstance(node, ast.Attribute) and node.attr in ("stdout", "stdin") and \
                isinstance(node.value, ast.Name) and node.value.id == "sys":
            found.append(f"sys.{node.attr} line {node.lineno}")
    if "signal" in imported_roots(tree):
        found.append("imports signal")
    return found


def test_only_the_cli_touches_the_terminal():
    offenders = {}
    for path in python_files():
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "cli" or rel.as_posix() == "__main__.py":  # `python -m swarm`: the CLI's
            continue
        uses = terminal_uses(ast.parse(path.read_text()))
        if uses:
            offenders[rel.as_posix()] = uses
    assert offenders == {}


def swarm_imports(path: Path) -> set[str]:
    """The swarm modules a file imports, at any depth (lazy imports inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("swarm."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("swarm"):
            # `from swarm.planner import paper` imports the module swarm.planner.paper
            found.update(f"{node.module}.{a.name}" if (PACKAGE.parent / node.module.replace(".", "/") / f"{a.name}.py")
                         .exists() else node.module for a in node.names)
    return found


def test_the_planner_has_no_import_cycle():
    """A cycle hidden behind lazy imports is still a cycle (api <-> strategies was one)."""
    modules = {m: swarm_imports(PACKAGE.parent / (m.replace(".", "/") + ".py")) for m in modules_under("planner")
               if not m.endswith("planner")}
    graph = {m: {d for d in deps if d in modules and d != m} for m, deps in modules.items()}
    done, path = set(), []

    def visit(module: str) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for dep in sorted(graph[module]):
            visit(dep)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


SOURCE_SIDE = ["source.py", "source_plan.py", "source_state.py", "runtime", "discovery"]


def test_the_source_side_knows_nothing_of_the_views():
    offenders = {}
    for part in SOURCE_SIDE:
        for path in ([PACKAGE / part] if part.endswith(".py") else sorted((PACKAGE / part).rglob("*.py"))):
            tree = ast.parse(path.read_text())
            bad = sorted(m for m in swarm_imports(path) if m.startswith(("swarm.view", "swarm.cli")))
            bad += sorted(imported_roots(tree) & {"rich"})
            if bad:
                offenders[path.relative_to(PACKAGE).as_posix()] = bad
    assert offenders == {}


@pytest.mark.parametrize("module", ["swarm.model.dtypes", "swarm.model.units", "swarm.cli.options"])
def test_tables_and_options_load_without_torch(module):
    """`swarm plan --help` and the model layout must not pay for importing torch."""
    assert not loaded_after_import(module) & set(HEAVY)
