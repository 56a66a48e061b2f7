"""The package layout: each module has one name in a process, and the modules import one another without a cycle.

The import graph is read with the standard library's ``ast`` from the installed package's own files
(every ``import`` and ``from … import``, inside functions too: an import deferred into a function
is still an arrow). A third-party tool (grimp, import-linter) would read the same statements; the
thirty lines below need no new dependency and name the cycle they find.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke

# The installed packages and the folders they are (pyproject.toml's package-dir).
PACKAGES = {"flanops.pipelines": "flanops.pipelines", "flanops.steps": "flanops.steps", "stepkit": "stepkit",
            "flanops.infra": "flanops.infra", "flanops.configs": "flanops.configs",
            "flanops.benchmarks": "flanops.benchmarks"}


def module_files() -> dict[str, Path]:
    """Every module of the installed packages by its import name."""
    modules = {}
    for package in PACKAGES:
        root = Path(str(resources.files(package)))
        for path in root.glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def imported_names(name: str, path: Path) -> set[str]:
    """The modules that ``path`` (module ``name``) imports, relative imports resolved."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)   # `from pkg import module`
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: {other for other in imported_names(name, path) if other in modules and other != name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as the path that closes it, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_is_read_from_the_installed_files():
    graph = import_graph()
    assert {"flanops.pipelines.cli", "flanops.pipelines.local", "flanops.infra.deploy", "stepkit.errors",
            "flanops.steps.finetune_lora"} <= set(graph)
    assert "stepkit.errors" in graph["flanops.steps.finetune_lora"]      # `from stepkit.errors import …`
    assert "flanops.pipelines.config" in graph["flanops.pipelines.definition"]   # `from .config import …`


def test_find_cycle_names_the_cycle_it_finds():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_module_imports_one_that_imports_it_back():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


LEAVES = {f"flanops.pipelines.{name}" for name in ("errors", "failures", "s3", "files", "home")}


def test_the_leaf_modules_import_only_leaves_and_stepkit():
    """The shared helpers sit at the bottom: importing one never pulls in the executor, the config or the CLI."""
    graph = import_graph()
    assert LEAVES <= set(graph)
    above = {leaf: sorted(other for other in graph[leaf] if other not in LEAVES and not other.startswith("stepkit"))
             for leaf in LEAVES}
    assert not any(above.values()), f"leaf modules importing modules above them: {above}"


def test_step_scripts_import_only_stepkit_of_ours():
    """steps/ ships alone as the jobs' source_dir: a script importing flanops would fail in its container."""
    graph = import_graph()
    scripts = [name for name in graph if name.startswith("flanops.steps.")]
    assert "flanops.steps.evaluate" in scripts
    outside = {name: sorted(other for other in graph[name] if not other.startswith("stepkit")) for name in scripts}
    assert not any(outside.values()), outside


ONE_NAME_PROBE = """
import importlib, json, pkgutil, sys
from flanops.pipelines.config import load_config
from flanops.pipelines.step_scripts import step_flags
from flanops.pipelines.tables import STEPS
load_config("quick")                      # the config checks import select_model.py for BaseModelId
for section in STEPS:
    step_flags(section)                   # every step script's flag parser
# every module the CLI can reach (commands imports most of them inside functions), and every step script
for package in ("flanops.pipelines", "flanops.infra", "flanops.benchmarks", "flanops.steps"):
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__, package + "."):
        if info.name not in ("flanops.benchmarks.onnx_peer", "flanops.steps.stepkit"):   # onnx_peer: its own venv
            importlib.import_module(info.name)
files = {}
for name, module in list(sys.modules.items()):
    path = getattr(module, "__file__", None)
    if path:
        files.setdefault(path, []).append(name)
print(json.dumps(files))
"""


def test_each_stepkit_module_is_loaded_under_one_name_only():
    """Every module of the client and every step's flag parser imported: each of our files is one module,
    under one name (``flanops.steps.stepkit`` exists only because steps/ ships whole as the jobs' source_dir)."""
    result = subprocess.run([sys.executable, "-c", ONE_NAME_PROBE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    files = json.loads(result.stdout)
    ours = [Path(str(resources.files(package))).resolve() for package in PACKAGES]
    loaded = {path: names for path, names in files.items()
              if any(Path(path).resolve().is_relative_to(root) for root in ours)}
    stepkit_names = [name for names in loaded.values() for name in names if "stepkit" in name]
    assert "stepkit.errors" in stepkit_names and "flanops.steps.finetune_lora" in {n for v in loaded.values() for n in v}
    twice = {path: names for path, names in loaded.items() if len(names) > 1}
    assert not twice, f"loaded under more than one name: {twice}"
    assert not [name for name in stepkit_names if name.startswith("flanops.steps.stepkit")]
