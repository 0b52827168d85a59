"""The top of ``service/pigateway`` stays small enough to read at a glance, and the module
map in docs/architecture.md names every entry there, and nothing that is not there.

A module that only one wing uses lives in that wing's package; the top level holds the
wings and what several of them share.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "service" / "pigateway"

#: At most this many entries at the top of the package (files and packages, ``py.typed``
#: and ``__main__.py`` included), as a newcomer's ``ls`` shows them.
MOST = 25

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
