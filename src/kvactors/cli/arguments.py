"""Argument types and shared options of the ``kvactors`` commands.

The argparse types every command uses (positive ints and numbers, fractions,
probabilities), the ``--blocks`` / ``--capacity`` pair of ``replay`` and
``bench policy`` with the tier size it gives, and how a ``TRACE`` argument
names a file or a bundled trace.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import TypeVar

from kvactors.config import MAX_BLOCKS
from kvactors.errors import ConfigError
from kvactors.traces import BUNDLED_TRACES, bundled_trace

__all__ = [
    "DEFAULT_CAPACITY",
    "add_capacity_arguments",
    "capacity_blocks",
    "parse_fraction",
    "positive_float",
    "positive_int",
    "probability",
    "resolve_trace",
]

DEFAULT_CAPACITY = Fraction(1, 10)
"""Capacity when neither ``--blocks`` nor ``--capacity`` is given: 10% of the unique blocks."""


def capacity_blocks(unique_blocks: int, *, blocks: int | None, fraction: Fraction | None) -> int:
    """The tier size: ``blocks`` if given, else ``floor(fraction * unique_blocks)``.

    ``fraction`` defaults to :data:`DEFAULT_CAPACITY` and is exact (a
    :class:`~fractions.Fraction`), so ``0.29`` of 100 blocks is 29, not 28.
    Raises :class:`~kvactors.errors.ConfigError` naming ``--blocks`` or
    ``--capacity`` when the result is not a positive number of blocks.
    """
    if blocks is not None:
        if blocks <= 0:
            raise ConfigError(f"--blocks must be a positive int, got {blocks}")
        return blocks
    frac = DEFAULT_CAPACITY if fraction is None else fraction
    n = math.floor(frac * unique_blocks)
    if n <= 0:
        raise ConfigError(
            f"--capacity {float(frac):g} of {unique_blocks:,} unique blocks is {n} blocks; "
            "it must give at least 1"
        )
    return n


def resolve_trace(name: str | None) -> Path:
    """The trace file for a ``TRACE`` argument.

    ``None`` is the bundled conversation trace; a bundled name
    (``conversation``, ``synthetic``) is that trace unless a file of that name
    exists (a directory of that name does not count); anything else is a path.
    """
    if name is None:
        return bundled_trace("conversation")
    if name in BUNDLED_TRACES and (not os.path.exists(name) or os.path.isdir(name)):
        return bundled_trace(name)
    return Path(name)


N = TypeVar("N", int, float, Fraction)


def _number(
    text: str, convert: Callable[[str], N], what: str, ok: Callable[[N], bool], bounds: str
) -> N:
    """An argparse type's body: ``convert(text)``, refused unless ``ok`` (``bounds`` says why)."""
    try:
        value = convert(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
    return value


def parse_fraction(text: str) -> Fraction:
    """argparse type of ``--capacity``: an exact fraction in (0, 1], such as ``0.1`` or ``1/8``."""
    return _number(text, Fraction, "a fraction", lambda v: 0 < v <= 1, "in (0, 1]")


def positive_int(text: str) -> int:
    """argparse type of a count such as ``--repeat``: a positive int."""
    return _number(text, int, "an int", lambda v: v > 0, "positive")


def non_negative_int(text: str) -> int:
    """argparse type of a start index: an int >= 0."""
    return _number(text, int, "an int", lambda v: v >= 0, ">= 0")


def block_count(text: str) -> int:
    """argparse type of a tier's slot count (``--blocks``): an int in 1..2**31-1 (slot ids
    are 32-bit)."""
    return _number(text, int, "an int", lambda v: 0 < v <= MAX_BLOCKS, f"in 1..{MAX_BLOCKS}")


def positive_float(text: str) -> float:
    """argparse type of a duration or a multiple: a finite number > 0."""
    return _number(text, float, "a number", lambda v: 0 < v < float("inf"), "positive")


def probability(text: str) -> float:
    """argparse type of a fault rate: a number in [0, 1]."""
    return _number(text, float, "a number", lambda v: 0 <= v <= 1, "in [0, 1]")


def add_capacity_arguments(parser: argparse.ArgumentParser) -> None:
    """``--blocks N`` or ``--capacity FRACTION`` (default 0.1), shared with ``bench policy``."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--blocks", type=block_count, metavar="N", help="tier size in blocks")
    group.add_argument(
        "--capacity",
        type=parse_fraction,
        metavar="FRACTION",
        help="tier size as a fraction of the trace's unique blocks, rounded down (default: 0.1)",
    )
