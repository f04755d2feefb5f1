"""The house's shape, held by tests (docs/ARCHITECTURE.md): the import-linter contracts pass,
a deliberate upward import fails them, no two modules import each other (imports inside
functions included), and every module and function stays a size a person can hold."""

import ast
import os
import shutil
import subprocess
import sys

import grimp
import pytest
from conftest import REPO

MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_PARAMETERS = 400, 60, 8
PACKAGES = ("launcher", "parallel")


def lint_imports(root) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the copy under test, not the installed checkout
    # --no-cache: its cache directory would be a new entry in the checkout (tests/conftest.py)
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()", "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_import_contracts_hold():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("launcher/config/schema.py", "from launcher.train import main", "launcher.config.schema -> launcher.train"),
    ("launcher/checkpoint/store.py", "from launcher.hf import export", "launcher.checkpoint.store -> launcher.hf"),
    ("parallel/costs.py", "import launcher.errors", "parallel.costs -> launcher.errors"),
])
def test_a_deliberate_upward_import_breaks_the_contracts(tmp_path, module, line, contract):
    for name in (*PACKAGES, ".importlinter"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n\ndef _upward():\n    {line}  # deliberately upward\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert contract in result.stdout, result.stdout[-3000:]


def _cycles(graph) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    sys.setrecursionlimit(10_000)

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in graph.find_modules_directly_imported_by(module):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(component)

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_two_modules_import_each_other():
    graph = grimp.build_graph(*PACKAGES)  # every import statement, those inside functions included
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    class Graph:
        modules = {"a", "b", "c"}
        edges = {"a": {"b"}, "b": {"a"}, "c": {"a"}}

        def find_modules_directly_imported_by(self, module):
            return self.edges[module]

    assert _cycles(Graph()) == [{"a", "b"}]


def _python_files():
    for package in PACKAGES:
        yield from sorted((REPO / package).rglob("*.py"))


def test_modules_and_functions_stay_small():
    too_big = []
    for path in _python_files():
        text = path.read_text()
        where = path.relative_to(REPO)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_big.append(f"{where}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = node.end_lineno - node.lineno + 1
            args = node.args
            params = [*args.posonlyargs, *args.args, *args.kwonlyargs, *filter(None, (args.vararg, args.kwarg))]
            count = len(params) - (1 if params and params[0].arg in ("self", "cls") else 0)
            if lines > MAX_FUNCTION_LINES:
                too_big.append(f"{where}:{node.lineno} {node.name}: {lines} lines")
            if count > MAX_PARAMETERS:
                too_big.append(f"{where}:{node.lineno} {node.name}: {count} parameters")
    assert too_big == []
