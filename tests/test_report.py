"""The report type every command returns, and the stderr progress bar."""

from __future__ import annotations

import io
import json

import pytest

from kvactors.cli.report import (
    COUNT,
    GBPS,
    RATE,
    RATIO,
    ProgressBar,
    Report,
    format_value,
    progress,
    progress_enabled,
)


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("value", "spec", "text"),
    [
        (None, None, "-"),
        (True, None, "yes"),
        (False, None, "no"),
        (1234567, None, "1,234,567"),
        (0.41234, None, "0.412"),
        (999.9996, None, "1000.000"),
        (1234567.8, None, "1,234,568"),
        (0.41234, RATIO, "0.412"),
        (1234567, COUNT, "1,234,567"),
        (987654.4, RATE, "987,654"),
        (12.3456, GBPS, "12.35"),
        ("lru", RATIO, "lru"),
    ],
)
def test_format_value(value: object, spec: str | None, text: str) -> None:
    assert format_value(value, spec) == text


def make_report() -> Report:
    return Report(
        title="demo table",
        columns=["policy", "hits", "ratio", "GB/s", "ok"],
        rows=[["lru", 80419, 0.27874, 3.14159, True], ["weighted_lru", 5, 1.0, None, False]],
        summary={"best": "lru", "hits": {"lru": 80419}},
        notes=["a note"],
        formats={"GB/s": GBPS},
    )


def test_render_aligns_columns() -> None:
    out = io.StringIO()
    make_report().render(out)
    assert out.getvalue() == (
        "demo table\n"
        "\n"
        "policy          hits  ratio  GB/s  ok\n"
        "------------  ------  -----  ----  ---\n"
        "lru           80,419  0.279  3.14  yes\n"
        "weighted_lru       5  1.000     -  no\n"
        "\n"
        "a note\n"
    )


def test_render_without_notes_or_rows() -> None:
    out = io.StringIO()
    Report(title="empty", columns=["a", "bb"], rows=[]).render(out)
    assert out.getvalue() == "empty\n\na  bb\n-  --\n"


def test_to_json_is_one_line_with_everything() -> None:
    text = make_report().to_json()
    assert "\n" not in text
    assert json.loads(text) == {
        "title": "demo table",
        "columns": ["policy", "hits", "ratio", "GB/s", "ok"],
        "rows": [["lru", 80419, 0.27874, 3.14159, True], ["weighted_lru", 5, 1.0, None, False]],
        "summary": {"best": "lru", "hits": {"lru": 80419}},
        "notes": ["a note"],
    }


def test_progress_silent_returns_the_iterable_itself() -> None:
    items = [1, 2, 3]
    out = io.StringIO()
    assert progress(items, 3, "x", enabled=False, file=out) is items
    assert out.getvalue() == ""


def test_progress_forced_draws_and_erases() -> None:
    out = io.StringIO()
    assert list(progress(range(4), 4, "lru", enabled=True, file=out)) == [0, 1, 2, 3]
    text = out.getvalue()
    assert text.startswith("\rlru [")
    assert "4/4" in text
    assert text.endswith("\r\x1b[2K")


def test_progress_shows_on_a_terminal_only_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    assert progress_enabled(FakeTTY())
    assert not progress_enabled(io.StringIO())
    monkeypatch.setenv("CI", "")  # set but empty counts as not set (docs/replay.md)
    assert progress_enabled(FakeTTY())
    monkeypatch.setenv("CI", "true")
    assert not progress_enabled(FakeTTY())
    tty = FakeTTY()
    assert list(progress([1], 1, "x", file=tty)) == [1]
    assert tty.getvalue() == ""


def test_progress_bar_counts_and_handles_zero_total() -> None:
    out = io.StringIO()
    with ProgressBar(0, "empty", enabled=True, file=out) as bar:
        bar.advance(3)
        assert bar.done == 3
    assert "100%" in out.getvalue()
    assert out.getvalue().endswith("\r\x1b[2K")
