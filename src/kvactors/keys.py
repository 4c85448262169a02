"""Block keys: what names a block in every layer, and the async API's checks of
keys and GPU-pool slot ids (one C pass each where ``kvactors._key_checks`` is
built, the same answers in Python otherwise)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

from kvactors.errors import InvalidKeyError

try:
    from kvactors._key_checks import first_bad_key as _first_bad_key
    from kvactors._key_checks import first_bad_slot as _first_bad_slot
except ImportError:  # built without a C compiler: the Python checks below
    _first_bad_key = None  # type: ignore[assignment]
    _first_bad_slot = None  # type: ignore[assignment]

Key: TypeAlias = bytes | int
"""A block key. Stable across processes: a chained hash as ``bytes`` or ``int``."""

__all__ = ["Key", "check_keys", "distinct_slots"]

_KEY_TYPES = frozenset((int, bytes))
_INT_TYPE = frozenset((int,))


def check_keys(keys: Sequence[Key], what: str = "") -> None:
    """Raise :class:`~kvactors.errors.InvalidKeyError` for a key that is not
    ``bytes``/``int`` or is named twice; ``what`` prefixes the message."""
    if _first_bad_key is not None and _first_bad_key(keys) < 0:
        return  # the common case, in one C pass
    prefix = f"{what}: " if what else ""
    # Without the compiled check (or to name the bad key): one set of types,
    # one set of keys, both built in C; the loops run only to name the culprit.
    if not set(map(type, keys)) <= _KEY_TYPES:
        for key in keys:
            if type(key) is not int and type(key) is not bytes:
                kind = type(key).__name__
                raise InvalidKeyError(
                    f"{prefix}block key {key!r} has type {kind}; keys must be bytes or int"
                )
    if len(set(keys)) != len(keys):
        seen: set[Key] = set()
        for key in keys:
            if key in seen:
                raise InvalidKeyError(f"{prefix}block key {key!r} is named twice in one call")
            seen.add(key)


def distinct_slots(ids: object, limit: int) -> bool:
    """Whether ``ids`` is a non-empty ``list`` of distinct plain ints in ``0..limit-1``.

    A fast yes for the common case (one C pass when it is built); a no says
    only that the caller must look closer (and name the error).
    """
    if type(ids) is not list or not ids:
        return False
    if _first_bad_slot is not None:
        return _first_bad_slot(ids, limit) < 0
    if not set(map(type, ids)) <= _INT_TYPE:
        return False  # strings, floats, bools: sortable among themselves, not slots
    order = sorted(ids)
    return order[0] >= 0 and order[-1] < limit and len(set(order)) == len(order)
