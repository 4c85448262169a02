"""Block keys: what names a block in every layer."""

from __future__ import annotations

from typing import TypeAlias

Key: TypeAlias = bytes | int
"""A block key. Stable across processes: a chained hash as ``bytes`` or ``int``."""

__all__ = ["Key"]
