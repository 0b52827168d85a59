"""The open sets are tables: ingest modes and row kinds each live in one table, and the
table covers every value the config accepts or the service puts, so a new one is a row of
its table and nowhere a branch to find."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

from pigateway.config import MODE_FORWARDS, IngestRule
from pigateway.ingest import MODES
from pigateway.store.values import KIND_PRIORITY, KINDS, NewCommand

SERVICE = Path(__file__).resolve().parents[1] / "service" / "pigateway"


def test_every_ingest_mode_the_config_accepts_has_a_row_in_the_table() -> None:
    accepted = set(typing.get_args(typing.get_type_hints(IngestRule)["mode"]))
    assert accepted == set(MODES)


def _kinds_put() -> set[str]:
    """Every ``kind="..."`` the service's code passes (a put, a NewCommand)."""
    found = set()
    for path in SERVICE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "kind" \
                    and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                found.add(node.value.value)
    return found


def test_every_row_kind_the_service_puts_has_a_row_in_the_table() -> None:
    put = _kinds_put() | {NewCommand("device", "name").kind}  # the default kind
    assert put == set(KINDS) == set(KIND_PRIORITY)


def test_every_ingest_mode_says_whether_it_forwards() -> None:
    accepted = set(typing.get_args(typing.get_type_hints(IngestRule)["mode"]))
    assert accepted == set(MODE_FORWARDS)


def _compares_a_mode_to_a_literal(node: ast.AST) -> bool:
    """``x.mode == "forward"``, ``"command" != rule.mode``, ``rule.mode in ("a", "b")``."""
    if not isinstance(node, ast.Compare):
        return False
    sides = [node.left, *node.comparators]
    names_mode = any(isinstance(side, ast.Attribute) and side.attr == "mode" for side in sides)
    literal = any(isinstance(side, ast.Constant | ast.Tuple | ast.List | ast.Set)
                  for side in sides)
    return names_mode and literal


def test_no_code_chooses_by_an_ingest_mode_outside_the_tables() -> None:
    """A branch on a mode's name is a place a new mode silently takes the other way."""
    found = [f"{path.relative_to(SERVICE)}:{node.lineno}"
             for path in SERVICE.rglob("*.py")
             for node in ast.walk(ast.parse(path.read_text()))
             if _compares_a_mode_to_a_literal(node)]
    assert found == []
