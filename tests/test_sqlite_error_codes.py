"""SQLite errors are told apart by their result code or by what the store knows, never by
the words of their message, which a trigger, a table's name or another SQLite version can
change: a refusal read from the text would then silently mean something else.
"""

from __future__ import annotations

import ast
import contextlib
import sqlite3
from pathlib import Path

import pytest

from pigateway.config import StoreConfig
from pigateway.errors import StoreConflict, StoreError
from pigateway.store import NewCommand, Store, puts
from pigateway.store.connection import translate
from pigateway.store.producer import Producer

SERVICE = Path(__file__).resolve().parent.parent / "service" / "pigateway"


def text_matches(tree: ast.AST) -> list[int]:
    """Lines where an error's text is searched for a literal: ``"x" in str(exc)``,
    ``str(exc).startswith("x")``, ``"x" in exc.args[0]``; an error is a name an ``except``
    binds, or a parameter annotated as an error or exception."""
    errors = _error_names(tree)
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant) \
                and any(isinstance(op, ast.In | ast.NotIn) for op in node.ops) \
                and any(_text_of(right, errors) for right in node.comparators):
            lines.append(node.lineno)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in {"startswith", "endswith", "find", "index"} \
                and _text_of(node.func.value, errors):
            lines.append(node.lineno)
    return sorted(lines)


def _error_names(tree: ast.AST) -> set[str]:
    names = {node.name for node in ast.walk(tree)
             if isinstance(node, ast.ExceptHandler) and node.name}
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and node.annotation is not None:
            annotation = ast.unparse(node.annotation)
            if annotation.endswith(("Error", "Exception")):
                names.add(node.arg)
    return names


def _text_of(node: ast.expr, errors: set[str]) -> bool:
    """``str(error)`` or ``error.args[...]``: the words of one of ``errors``."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "str":
        return any(isinstance(arg, ast.Name) and arg.id in errors for arg in node.args)
    return (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "args" and isinstance(node.value.value, ast.Name)
            and node.value.value.id in errors)


def test_no_module_of_the_service_reads_an_error_by_its_words() -> None:
    found = [f"{path.relative_to(SERVICE)}:{line}"
             for path in sorted(SERVICE.rglob("*.py"))
             for line in text_matches(ast.parse(path.read_text()))]
    assert found == []


def test_the_check_finds_each_way_of_reading_an_error_by_its_words() -> None:
    source = ('try:\n    pass\nexcept Exception as exc:\n    a = "no such" in str(exc)\n'
              '    b = str(exc).startswith("UNIQUE")\n    c = "x" not in exc.args[0]\n'
              '    d = isinstance(exc, ValueError) or "s" in str(path)\n'
              'def taken(error: StoreError) -> bool:\n    return "keys" in str(error)\n')
    assert text_matches(ast.parse(source)) == [4, 5, 6, 9]


def test_a_constraint_is_a_conflict_by_its_code_whatever_its_message() -> None:
    """The code decides, on real SQLite errors: a trigger's refusal (a constraint, in words
    of its own) is a conflict; a missing table whose name reads like a constraint is not."""
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        conn.executescript("CREATE TABLE t (k PRIMARY KEY); CREATE TRIGGER no BEFORE INSERT "
                           "ON t BEGIN SELECT RAISE(ABORT, 'a trigger''s own words'); END;")
        with pytest.raises(sqlite3.IntegrityError) as conflict:
            conn.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(sqlite3.OperationalError) as other:
            conn.execute('SELECT * FROM "UNIQUE constraint failed: producer_keys.key"')
    assert str(conflict.value) == "a trigger's own words"
    assert "UNIQUE constraint failed: producer_keys" in str(other.value)
    refused, missing = (translate(error.value, Path("q.db")) for error in (conflict, other))
    assert isinstance(refused, StoreConflict) and puts.key_may_be_taken(refused)
    assert not isinstance(missing, StoreConflict) and not puts.key_may_be_taken(missing)


async def test_a_keyed_put_refused_for_another_conflict_is_that_refusal(
        tmp_path: Path) -> None:
    """A keyed put whose command id is already queued fails with that conflict (nothing
    queued, the key not taken), in the service's store and in ``send``'s producer alike."""
    config = StoreConfig(path=tmp_path / "queue.db", min_free_bytes=0)
    async with await Store.open(config) as store:
        first = await store.put("d", "on")
        with pytest.raises(StoreConflict):
            await store.put_keyed("fresh-key", NewCommand("d", "on", id=first.id))
        assert await store.key_owner("fresh-key") is None
        assert (await store.stats()).depth == 1
    with Producer.open(config) as producer:
        with pytest.raises(StoreConflict):
            producer.put_keyed("other-key", NewCommand("d", "on", id=first.id))
        command, id_ = producer.put_keyed("other-key", NewCommand("d", "on"))
        assert command is not None and id_ == command.id
        assert producer.put_keyed("other-key", NewCommand("d", "on")) == (None, id_)
    assert issubclass(StoreConflict, StoreError)
