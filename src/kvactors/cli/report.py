"""What every CLI command returns: a titled table, machine-readable figures, a progress bar.

A command builds one :class:`Report`. ``render`` prints it for people (an
aligned table, numbers formatted by :func:`format_value`); ``to_json`` gives
the same content as exactly one line of JSON, which is all a command prints
with ``--json``. Progress goes to stderr, and only to a terminal, so neither
form of output is ever mixed with it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import TextIO, TypeVar

import msgspec

__all__ = [
    "COUNT",
    "GBPS",
    "RATE",
    "RATIO",
    "ProgressBar",
    "Report",
    "format_value",
    "progress",
    "progress_enabled",
]

T = TypeVar("T")

# Format specs for ``Report.formats`` (``format(value, spec)``).
RATIO = ".3f"
"""Hit ratios and speed-up factors: ``0.412``."""
COUNT = ","
"""Counts: ``1,234,567``."""
RATE = ",.0f"
"""Large rates such as operations per second: ``1,234,567``."""
GBPS = ".2f"
"""Bandwidth in GB/s: ``12.34``."""


def format_value(value: object, spec: str | None = None) -> str:
    """One table cell.

    With ``spec``, numbers are formatted with it. Without: ``None`` is ``-``,
    booleans are ``yes``/``no``, ints get thousands separators, floats below
    1,000 get three decimals (ratios) and larger floats none, with separators.
    Anything else is ``str(value)``.
    """
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        if spec is not None:
            return format(value, spec)
        if isinstance(value, int):
            return f"{value:,}"
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Report(msgspec.Struct, kw_only=True):
    """The result of one command.

    ``columns`` name the table's columns and each row has one value per
    column. ``summary`` holds the machine-readable figures (JSON types only);
    ``notes`` are lines printed under the table. ``formats`` maps a column name
    to a format spec such as :data:`RATIO` or :data:`GBPS`; columns not named
    there use :func:`format_value`'s defaults. ``status`` is the command's exit
    status once the report is printed: 0, or 1 for a run that found the cache
    wrong (``bench soak``: a byte served wrong, a block lost, an invariant broken).
    """

    title: str
    columns: list[str]
    rows: list[list[object]]
    summary: dict[str, object] = {}
    notes: list[str] = []
    formats: dict[str, str] = {}
    status: int = 0

    def render(self, file: TextIO | None = None) -> None:
        """Print the title, the table and the notes to ``file`` (default stdout).

        Columns holding only numbers (and ``None``) are right-aligned, others
        left-aligned.
        """
        out = sys.stdout if file is None else file
        specs = [self.formats.get(name) for name in self.columns]
        cells = [
            [format_value(value, spec) for value, spec in zip(row, specs)] for row in self.rows
        ]
        numeric = [
            all(_is_number(row[i]) or row[i] is None for row in self.rows)
            and any(row[i] is not None for row in self.rows)
            for i in range(len(self.columns))
        ]
        widths = [
            max([len(name)] + [len(row[i]) for row in cells]) for i, name in enumerate(self.columns)
        ]

        def line(values: list[str]) -> str:
            parts = [
                value.rjust(width) if right else value.ljust(width)
                for value, width, right in zip(values, widths, numeric)
            ]
            return "  ".join(parts).rstrip()

        print(self.title, file=out)
        print(file=out)
        print(line(self.columns), file=out)
        print(line(["-" * width for width in widths]), file=out)
        for row in cells:
            print(line(row), file=out)
        if self.notes:
            print(file=out)
            for note in self.notes:
                print(note, file=out)

    def to_json(self) -> str:
        """The whole report as one line of JSON (no newline inside or at the end)."""
        return msgspec.json.encode(
            {
                "title": self.title,
                "columns": self.columns,
                "rows": self.rows,
                "summary": self.summary,
                "notes": self.notes,
            }
        ).decode()


def progress_enabled(file: TextIO | None = None) -> bool:
    """Whether a progress bar shows by default: ``file`` (stderr) is a terminal, not under CI."""
    stream = sys.stderr if file is None else file
    if os.environ.get("CI"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


class ProgressBar:
    """A one-line progress bar on stderr, redrawn at most ten times a second.

    ``enabled=None`` shows it when :func:`progress_enabled` says so; ``True``
    forces it and ``False`` silences it (``--json`` does). Use it as a context
    manager and call :meth:`advance`; closing erases the line, so what follows
    on the terminal starts clean.
    """

    _WIDTH = 30

    def __init__(
        self,
        total: int,
        label: str,
        *,
        enabled: bool | None = None,
        file: TextIO | None = None,
    ) -> None:
        self.total = max(0, total)
        self.label = label
        self.done = 0
        self._file = sys.stderr if file is None else file
        self.enabled = progress_enabled(self._file) if enabled is None else enabled
        self._last_draw = 0.0
        self._drawn = False

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more items done and redraw if the last draw is old enough."""
        self.done += n
        if self.enabled:
            now = time.monotonic()
            if now - self._last_draw >= 0.1 or self.done >= self.total:
                self._last_draw = now
                self._draw()

    def _draw(self) -> None:
        total = self.total
        frac = min(1.0, self.done / total) if total else 1.0
        filled = int(frac * self._WIDTH)
        bar = "#" * filled + "-" * (self._WIDTH - filled)
        text = f"\r{self.label} [{bar}] {frac:4.0%} {self.done:,}/{total:,}"
        self._file.write(text)
        self._file.flush()
        self._drawn = True

    def close(self) -> None:
        """Erase the bar's line (when one was drawn)."""
        if self._drawn:
            self._file.write("\r\x1b[2K")
            self._file.flush()
            self._drawn = False

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def progress(
    iterable: Iterable[T],
    total: int,
    label: str,
    *,
    enabled: bool | None = None,
    file: TextIO | None = None,
) -> Iterable[T]:
    """Yield from ``iterable`` while a :class:`ProgressBar` of ``total`` items shows.

    When the bar would not show, ``iterable`` itself is returned, so a silent
    loop costs nothing extra.
    """
    bar = ProgressBar(total, label, enabled=enabled, file=file)
    if not bar.enabled:
        return iterable
    return _with_bar(iterable, bar)


def _with_bar(iterable: Iterable[T], bar: ProgressBar) -> Iterator[T]:
    with bar:
        for item in iterable:
            yield item
            bar.advance()
