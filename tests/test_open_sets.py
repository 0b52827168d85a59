"""The open sets are tables: ingest modes and row kinds each live in one table, and the
table covers every value the config accepts or the service puts, so a new one is a row of
its table and nowhere a branch to find."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

from pigateway.config import IngestRule
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
