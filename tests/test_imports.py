"""The package's import structure: no module-level import cycle, and billing never imports the
CLI (the CLI is built on billing, and the server runs billing without the CLI)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import cellvpn

ROOT = Path(cellvpn.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_cli(module: str) -> bool:
    """The CLI's modules (``cellvpn.ctl`` was its entry point before it had a package)."""
    return module == "cellvpn.ctl" or module.startswith("cellvpn.cli")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports run when the module is imported: not in functions, classes' methods or
    ``if TYPE_CHECKING:`` blocks."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            yield from _top_level(node.body)
            yield from _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            yield from _top_level(node.body)
            for handler in node.handlers:
                yield from _top_level(handler.body)
            yield from _top_level(node.orelse)
            yield from _top_level(node.finalbody)
        elif isinstance(node, ast.ClassDef):
            yield from _top_level(node.body)


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The cellvpn modules an import statement loads."""
    names: set[str] = set()
    if isinstance(node, ast.Import):
        names = {alias.name for alias in node.names}
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".")
            if MODULES[module].name != "__init__.py":
                package.pop()
            package = package[: len(package) - node.level + 1]
            base = ".".join([*package, base] if base else package)
        names = {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {n for n in names if n in MODULES and n != module}


def _graph(everywhere: bool = False) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        nodes: Iterator[ast.AST] = ast.walk(tree) if everywhere else _top_level(tree.body)
        edges: set[str] = set()
        for node in nodes:
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges |= _targets(module, node)
        graph[module] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_cli() -> None:
    """The walk finds what it is meant to check: the CLI imports billing."""
    graph = _graph()
    assert "cellvpn.billing.sqlite" in graph["cellvpn.cli.ledger"]
    assert "cellvpn.cli.ledger" in graph["cellvpn.cli.main"]


def test_no_module_level_import_cycle() -> None:
    """No cellvpn module imports, at module level, one that imports it back."""
    assert _cycles(_graph()) == []


def test_a_cycle_is_found() -> None:
    """The cycle check itself finds a two-module cycle."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


def test_billing_imports_nothing_of_the_cli() -> None:
    """Not even inside a function: billing is below the CLI."""
    graph = _graph(everywhere=True)
    bad = {
        (module, target)
        for module, targets in graph.items()
        if module.startswith("cellvpn.billing")
        for target in targets
        if _is_cli(target)
    }
    assert bad == set()


def test_only_the_cli_imports_the_cli_at_module_level() -> None:
    """A service loads the CLI only when a caller asks for a ledger command."""
    graph = _graph()
    bad = {
        (module, target)
        for module, targets in graph.items()
        if not _is_cli(module)
        for target in targets
        if _is_cli(target)
    }
    assert bad == set()
