"""The layering the README draws, checked rather than hoped for.

* The import-linter contracts in ``pyproject.toml`` (layers, forbidden imports, no
  cycles between siblings) hold; ``make lint`` runs the same contracts.
* No import cycle anywhere among Tollgate's modules, across packages too.
* Workflow modules import activity and model modules only through the sandbox's
  pass-through, and never an I/O or clock module at all.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import TypeVar

import grimp

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tollgate", "tollgate_dev", "workflows", "activities")


def test_the_import_contracts_hold() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    run = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_among_all_modules() -> None:
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    modules = {m for m in graph.modules if m.split(".")[0] in PACKAGES}
    edges = {m: graph.find_modules_directly_imported_by(m) & modules for m in modules}
    # A package's __init__ importing its own modules is not a cycle of design.
    edges = {
        m: {n for n in targets if not (n.startswith(m + ".") or m.startswith(n + "."))}
        for m, targets in edges.items()
    }
    assert _cycles(edges) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


_IO_OR_CLOCK = {"httpx", "asyncpg", "requests", "time", "random", "socket", "os", "uuid"}


def test_workflows_import_activities_and_models_only_through_the_passthrough() -> None:
    offenders: list[str] = []
    for path in sorted((ROOT / "workflows").glob("*.py")):
        tree = ast.parse(path.read_text())
        passed_through: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.With) and any(
                "imports_passed_through" in ast.unparse(item.context_expr) for item in node.items
            ):
                passed_through.update(id(inner) for inner in ast.walk(node))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                where = f"{path.relative_to(ROOT)}:{node.lineno} {module}"
                if top in _IO_OR_CLOCK:
                    offenders.append(f"{where} (I/O or clock in workflow code)")
                elif top in ("activities", "tollgate") and id(node) not in passed_through:
                    offenders.append(f"{where} (not through imports_passed_through)")
    assert offenders == []


def _stateless(value: object) -> bool:
    """Code, types, or a value no run can change: what modules shared between runs may hold."""
    if isinstance(value, (ModuleType, type, TypeVar, MappingProxyType)) or callable(value):
        return True
    try:
        hash(value)  # str, numbers, tuples, frozensets, enums, frozen models
    except TypeError:
        return False
    return not isinstance(value, (list, dict, set, bytearray))


def test_workflow_modules_hold_no_state_a_run_could_leave_for_the_next() -> None:
    """The worker shares workflow modules between runs (``reimport_workflow_modules``
    off): a module-level list or dict one run appended to would reach the next run and
    break determinism on replay. So every module-level value must be immutable."""
    offenders = [
        f"{name}.{attr} = {value!r}"
        for name in [f"workflows.{p.stem}" for p in sorted((ROOT / "workflows").glob("*.py"))]
        for attr, value in vars(importlib.import_module(name)).items()
        if not attr.startswith("__") and not _stateless(value)
    ]
    assert offenders == []
    assert not _stateless([]) and not _stateless({}), "the check can fail"


_WITHOUT_DEV = "import sys; sys.modules['tollgate_dev'] = None; "


def test_the_runtime_runs_with_the_development_package_removed() -> None:
    """A deployment may ship ``tollgate/``, ``workflows/``, ``activities/``, ``worker.py``
    and ``starter.py`` without ``tollgate_dev/`` (sandbox, local stack, demo, load): the
    worker imports, and the CLI works, without the development commands."""
    worker = subprocess.run(
        [sys.executable, "-c", _WITHOUT_DEV + "import worker, tollgate.api.app"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode == 0, worker.stderr
    cli = subprocess.run(
        [
            sys.executable,
            "-c",
            _WITHOUT_DEV + "import runpy; sys.argv = ['starter.py', '--help']; "
            "runpy.run_path('starter.py', run_name='__main__')",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    commands = cli.stdout
    assert "order" in commands and "message" in commands and "reconcile" in commands
    assert " demo " not in commands and " load " not in commands
