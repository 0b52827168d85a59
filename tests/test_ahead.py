"""The rows claimed ahead, per device: a device's rows never change order, whatever goes
out, is dead-lettered or comes back; and the whole stays the single list it replaces."""

from __future__ import annotations

from pigateway.uplink.ahead import Ahead
from test_batching import Row


def ids(rows: list[Row]) -> list[str]:
    return [row.id for row in rows]


def held(spec: str) -> tuple[Ahead[Row], list[Row]]:
    """Rows for a spec like ``"abab"``: one row per letter (its device), ids in claim order."""
    rows = [Row(id=f"c{n}", device=device) for n, device in enumerate(spec)]
    ahead: Ahead[Row] = Ahead()
    ahead.extend(rows)
    return ahead, rows


def test_rows_stay_in_claim_order_and_counts_follow() -> None:
    ahead, rows = held("abcab")
    assert ids(ahead.in_order()) == ids(rows)
    assert len(ahead) == 5 and ahead.devices() == 3
    assert ahead.ready({"a"}) == ["b", "c"]


def test_candidates_are_each_free_devices_first_rows_in_claim_order() -> None:
    ahead, _ = held("abacb")
    picked = ahead.candidates(ahead.ready({"c"}), budget=10**6, most=50)
    assert ids(picked) == ["c0", "c1", "c2", "c4"]
    assert ids(ahead.candidates(ahead.ready(()), budget=10**6, most=1)) == ["c0", "c2"]


def test_a_solo_row_ends_its_devices_candidates() -> None:
    ahead: Ahead[Row] = Ahead()
    ahead.extend([Row("c0", "a"), Row("c1", "a", kind="result"), Row("c2", "a")])
    assert ids(ahead.candidates(["a"], budget=10**6, most=50)) == ["c0", "c1"]


def test_removing_keeps_the_rest_of_each_device_in_order_and_moves_it_last() -> None:
    ahead, rows = held("aabab")
    picked = ahead.candidates(ahead.ready(()), budget=10**6, most=50)
    kept = [rows[1], rows[3]]  # a's second row waits, b's first too: their later rows stay behind
    assert ahead.remove(picked, kept) == 3
    assert ids(ahead.in_order()) == ["c1", "c3"]
    assert len(ahead) == 2


def test_rows_put_back_go_first_in_the_order_they_came_back() -> None:
    ahead, _ = held("ab")
    ahead.put_first([Row("x1", "a"), Row("x2", "b"), Row("x3", "a")])
    assert ids(ahead.in_order()) == ["x1", "x2", "x3", "c0", "c1"]
    assert ahead.ready(()) == ["a", "b"]
    assert ids(ahead.candidates(["a"], budget=10**6, most=50)) == ["x1", "x3", "c0"]
    ahead.put_first([Row("y1", "b")])  # a later return goes ahead of an earlier one
    assert ids(ahead.in_order())[:2] == ["y1", "x1"]
