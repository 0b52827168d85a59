"""pigateway.text: the one helper every reason, detail, last_error and log line goes through."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from pigateway.text import MAX_TEXT, bounded, encodable, fit_json

any_text = st.text(st.characters(blacklist_categories=()), max_size=3000)


@settings(max_examples=300, deadline=None)
@given(any_text, st.integers(1, 2000))
def test_bounded_text_is_short_printable_and_encodable(text: str, limit: int) -> None:
    shown = bounded(text, limit)
    assert len(shown) <= limit
    assert encodable(shown)
    assert not any(ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f for c in shown)


@settings(max_examples=300, deadline=None)
@given(any_text, st.integers(0, 3000))
def test_fit_json_always_fits_its_budget(text: str, budget: int) -> None:
    fitted = fit_json(bounded(text), budget)
    assert fitted == "" or len(json.dumps(fitted, ensure_ascii=False).encode()) <= budget


def test_what_bounded_does_to_hostile_input() -> None:
    assert bounded("a\ud800b\x00c\n") == "a\\ud800b\\x00c\\x0a"
    assert bounded("k" * 13_000) == "k" * (MAX_TEXT - 3) + "..."
    assert bounded(ValueError("x" * 10), 8) == "xxxxx..."

    class Broken:
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert "cannot be shown" in bounded(Broken())
