"""No module of the service imports itself back, directly or round a circle.

A circle of imports makes the import order matter (a name taken from a half-run module is
missing) and ties rooms that should stand alone. Every import counts that runs at some
time: at module level or deferred inside a function (a deferred import is a circle put off,
not removed). Only imports under ``if TYPE_CHECKING:`` are left out, since they never run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "service" / "pigateway"


def module_names(root: Path) -> dict[str, Path]:
    """Every module of the package at ``root``, by its dotted name."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node under ``node`` that may run: all but the bodies of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _type_checking(child.test):
            for orelse in child.orelse:
                yield orelse
                yield from _runtime_nodes(orelse)
            continue
        yield child
        yield from _runtime_nodes(child)


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's own modules that module ``name`` imports when it runs."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                whole = f"{base}.{alias.name}"
                found.add(whole if whole in modules else base)
    return {other for other in found if other in modules and other != name}


def circles(modules: dict[str, Path]) -> list[list[str]]:
    """Each strongly connected group of two or more modules (Tarjan), sorted."""
    graph = {name: imported(name, path, modules) for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def test_the_service_has_no_import_circle() -> None:
    modules = module_names(PACKAGE)
    assert "pigateway.store.queue" in modules and len(modules) > 40
    assert circles(modules) == []


def test_a_circle_is_found_at_module_level_or_deferred_but_not_for_type_checking(
        tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    (root / "a.py").write_text("from pkg import b\n")
    (root / "b.py").write_text("def f():\n    from pkg.sub import c\n    return c\n")
    (root / "sub" / "c.py").write_text("try:\n    from ..a import x\nexcept ImportError:\n"
                                       "    pass\n")
    (root / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                               "    from pkg import e\n")
    (root / "e.py").write_text("import pkg.d\n")
    assert circles(module_names(root)) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    (root / "b.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    import pkg.sub.c\n")
    assert circles(module_names(root)) == []
