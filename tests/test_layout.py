"""The top of ``service/pigateway`` stays small enough to read at a glance, the module map
in docs/architecture.md names every entry there and nothing that is not there, and no class
grows past what a reader holds in mind at once.

A module that only one wing uses lives in that wing's package; the top level holds the
wings and what several of them share. A class past :data:`LONGEST_CLASS` lines hands a
part of its work to a room of its own (as the store's Outbox and the uplink's Drain do).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "service" / "pigateway"

#: At most this many entries at the top of the package (files and packages, ``py.typed``
#: and ``__main__.py`` included), as a newcomer's ``ls`` shows them.
MOST = 25

#: The most lines a class of the service may span, docstring and blank lines included.
LONGEST_CLASS = 300

#: Entries every Python package has, which the map does not list.
PLUMBING = {"__init__.py", "__main__.py", "py.typed"}


def top_level() -> set[str]:
    """What ``ls service/pigateway`` shows, bytecode caches left out."""
    return {path.name for path in SERVICE.iterdir() if path.name != "__pycache__"}


def mapped() -> set[str]:
    """The names in the first column of the module map ("## The code"), as entries: a
    package ``name/`` as ``name``, a module ``name`` as ``name.py``."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("\n## The code\n", 1)[1].split("\n\n| room |", 1)[0]
    names = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            for name in re.findall(r"`([a-z_]+/?)`", line.split("|")[1]):
                names.add(name.rstrip("/") if name.endswith("/") else f"{name}.py")
    return names


def test_the_top_level_has_at_most_25_entries() -> None:
    entries = top_level()
    assert "store" in entries and "cli" in entries
    assert len(entries) <= MOST, (
        f"service/pigateway has {len(entries)} entries: move a module into the package "
        f"of its only user ({sorted(entries)})")


def test_the_module_map_names_every_top_level_entry() -> None:
    named = mapped()
    assert len(named) > 10, "docs/architecture.md's module map was not found"
    assert named == top_level() - PLUMBING


def class_lengths(root: Path) -> dict[str, int]:
    """Every class under ``root`` (``path:Name``) and the lines it spans."""
    return {f"{path.relative_to(root)}:{node.name}": node.end_lineno - node.lineno + 1
            for path in sorted(root.rglob("*.py"))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None}


def test_no_class_of_the_service_spans_over_300_lines() -> None:
    lengths = class_lengths(SERVICE)
    assert "store/queue.py:Store" in lengths
    assert {name: n for name, n in lengths.items() if n > LONGEST_CLASS} == {}


def test_the_class_length_counts_every_line_of_a_class(tmp_path: Path) -> None:
    body = "".join(f"    x{n} = {n}\n" for n in range(LONGEST_CLASS))
    (tmp_path / "big.py").write_text(f"class Big:\n{body}\n\nclass Small:\n    pass\n")
    assert class_lengths(tmp_path) == {"big.py:Big": LONGEST_CLASS + 1, "big.py:Small": 2}
