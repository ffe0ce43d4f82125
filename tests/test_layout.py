"""The layout keeps its promises: no import cycles in src/, nothing private imported across
modules, no environment changed at import, each default written once, one list of operations,
comments without benchmark figures."""

from __future__ import annotations

import ast
import io
import os
import re
import subprocess
import sys
import tokenize
from collections.abc import Iterator
from pathlib import Path

from embedding_worker import operations
from embedding_worker.config import WorkerConfig, load_config
from embedding_worker.engines import EngineSettings, Health, ModelRegistry
from embedding_worker.limits import Limits
from embedding_worker.transports import runpod
from tests.conftest import ROOT

PACKAGE = ROOT / "src" / "embedding_worker"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(name: str, type_checking: bool = False) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for each import in `name`, resolved to module
    names: those at the top and those inside functions (lazy ones run too, later); imports only
    for type checkers are counted with `type_checking` (a cycle through one is still a cycle in
    the design, and mypy follows it)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if not type_checking and _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [alias.name for alias in node.names]
            for taken in names:  # `from . import errors` imports the module errors
                if f"{target}.{taken}" in MODULES:
                    found.append((f"{target}.{taken}", []))
            rest = [n for n in names if f"{target}.{n}" not in MODULES]
            if rest or not node.names:
                found.append((target, rest))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return [(target, names) for target, names in found if target in MODULES]


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """The first import cycle found in `graph` (module -> the modules it imports), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                found = visit(target, [*path, target])
                if found:
                    return found
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            found = visit(name, [name])
            if found:
                return found
    return None


def import_graph(type_checking: bool) -> dict[str, set[str]]:
    return {name: {t for t, _ in imports(name, type_checking) if t != name} for name in MODULES}


def test_the_import_scan_sees_the_package():
    assert "embedding_worker.operations.embeddings" in MODULES
    targets = {target for target, _ in imports("embedding_worker.dispatch")}
    assert {"embedding_worker.operations", "embedding_worker.engines"} <= targets


def test_the_import_scan_counts_lazy_and_type_checking_imports():
    lazy = {t for t, _ in imports("embedding_worker.cli")}
    assert "embedding_worker.transports.batch_files" in lazy  # imported inside functions
    assert "embedding_worker.engines" not in {t for t, _ in imports("embedding_worker.prompts")}
    checked = {t for t, _ in imports("embedding_worker.prompts", type_checking=True)}
    assert "embedding_worker.engines" in checked  # only under TYPE_CHECKING
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert import_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_in_src():
    """Lazy imports and imports for type checkers count: either way round, two modules that
    import each other are one module's worth of design split in two."""
    cycle = import_cycle(import_graph(type_checking=True))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_nothing_private_is_imported_across_modules():
    private = [
        f"{name} imports {target}.{taken}"
        for name in MODULES
        for target, names in imports(name)
        for taken in names
        if taken.startswith("_") and target != name
    ]
    assert not private


def test_importing_every_module_changes_no_environment_variable():
    probe = (
        "import importlib, os, sys\n"
        "before = dict(os.environ)\n"
        f"for name in {sorted(n for n in MODULES if not n.endswith('__main__'))!r}:\n"
        "    importlib.import_module(name)\n"
        "keys = set(before) | set(os.environ)\n"
        "changed = sorted(k for k in keys if before.get(k) != os.environ.get(k))\n"
        "print(changed)\n"
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFINITY_", "RUNPOD_"))}
    env.pop("DO_NOT_TRACK", None)
    proc = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_an_empty_environment_gives_the_written_defaults():
    config = load_config({})
    assert config == WorkerConfig(models=config.models)
    assert config.limits == Limits()
    assert config.engine_settings == EngineSettings()


def test_one_list_of_operations_gives_every_route():
    routes = [op.route for op in operations.OPERATIONS if op.route]
    assert len(routes) == len(set(routes))
    assert operations.ROUTES == tuple(routes)
    assert set(operations.LINE_ROUTES) <= set(routes)
    no_models = ModelRegistry([], Health())
    for op in operations.OPERATIONS:
        matched = operations.match_route(op.route + "/") if op.route else None
        assert op.route is None or (matched is not None and matched[0] is op)
        for field in op.job_fields:
            found = runpod.recognise({field: "x"}, no_models)
            assert found is not None and field in found.job_fields


# A ratio (0.86x), an approximation (~20), a percentage, a measurement's circumstances, a date.
FIGURE = re.compile(r"\b\d+(\.\d+)?x\b|~\d|\b\d+(\.\d+)?\s?%|\bmeasured (at|on)\b|\b20\d\d-\d\d")


def prose(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of each comment and docstring in a module."""
    source = path.read_text()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            if (doc := ast.get_docstring(node, clean=False)) is not None:
                yield node.body[0].lineno, doc


def test_comments_carry_no_benchmark_figures():
    """Comments and docstrings say why, in the present tense; figures (ratios, percentages,
    approximations, dates) belong to bench/RESULTS.md and docs/design.md, which say how and when
    they were measured."""
    found = [
        f"{path.relative_to(ROOT)}:{line}: {match.group(0)!r}"
        for path in MODULES.values()
        for line, text in prose(path)
        for match in FIGURE.finditer(text)
    ]
    assert not found
