"""What the Python manager checks in what it is handed: keys and a policy's answers.

A key that cannot be looked up, a new key that is not exactly ``bytes`` or
``int`` or is named twice, and a policy answer that breaks the
:class:`~kvactors.policy.CachePolicy` contract (``admit`` returning other than
a leading part of the new keys, ``evict`` returning other than ``n`` idle
blocks it holds) each raise the typed error the compiled core raises too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from kvactors.errors import InvalidKeyError, PolicyError
from kvactors.keys import Key
from kvactors.policy._base import BlockStatus, CachePolicy

__all__ = [
    "KEY_TYPES",
    "admitted_keys",
    "check_new_keys",
    "check_usable",
    "check_victims",
    "is_none",
    "key_fault",
    "key_tuple",
]

KEY_TYPES = frozenset((int, bytes))
"""The types a new key may have (exactly; no subclasses)."""


def key_fault(method: str, key: object, exc: Exception) -> NoReturn:
    """A key's lookup raised: the typed error both cores raise, chained."""
    kind = type(key).__name__
    raise InvalidKeyError(
        f"{method}: block key of type {kind} is not usable ({type(exc).__name__}: {exc})"
    ) from exc


def key_tuple(method: str, keys: Iterable[Any]) -> tuple[Any, ...]:
    """A call's keys as a tuple; a ``keys`` that is not iterable (``None``, an
    ``int``) or is one key's bytes or a string (whose items would be taken for
    keys) raises the :class:`~kvactors.errors.InvalidKeyError` the compiled
    core raises."""
    if isinstance(keys, (bytes, bytearray, str, memoryview)):
        kind = type(keys).__name__
        raise InvalidKeyError(
            f"{method}: keys must be an iterable of keys, got one {kind} "
            "(for a single key, pass [key])"
        )
    try:
        return tuple(keys)
    except TypeError:
        kind = type(keys).__name__
        raise InvalidKeyError(f"{method}: keys must be an iterable of keys, got {kind}") from None


def check_usable(get: Callable[[Any], object], method: str, keys: Iterable[Any]) -> None:
    """Every key can be looked up by ``get`` (exact int/bytes always can)."""
    for key in keys:
        if type(key) not in KEY_TYPES:
            try:
                get(key)
            except Exception as exc:
                key_fault(method, key, exc)


def admitted_keys(policy: CachePolicy, answer: object, to_store: list[Key]) -> list[Key]:
    """``admit``'s answer is a leading part of the new keys (each the same
    type and value, in order), or ``PolicyError``; returns that part."""
    try:
        admitted = list(answer)  # type: ignore[call-overload]
    except TypeError:
        admitted = None
    if (
        admitted is None
        or len(admitted) > len(to_store)
        or any(type(a) is not type(b) or a != b for a, b in zip(admitted, to_store))
    ):
        raise PolicyError(
            f"policy {policy!r} broke the CachePolicy contract: admit returned "
            f"{answer!r}, not a leading part of the new keys {to_store!r}"
        )
    return to_store[: len(admitted)]


def check_victims(
    policy: CachePolicy,
    num_blocks: int,
    n: int,
    victims: list[tuple[Key, BlockStatus]],
    keys: tuple[Key, ...],
) -> None:
    """``evict``'s answer keeps the ``CachePolicy`` contract, or ``PolicyError``."""

    def broken(what: str, shown: object) -> NoReturn:
        raise PolicyError(
            f"policy {policy!r} broke the CachePolicy contract: "
            f"evict({n}) returned {shown!r}, {what}"
        )

    victims = list(victims)
    if len(victims) != n:
        broken("victims, not exactly n", len(victims))
    protected = set(keys)
    for pair in victims:
        if type(pair) is not tuple or len(pair) != 2:
            broken("not a (key, block) pair", pair)
        key, block = pair
        if not isinstance(block, BlockStatus) or not 0 <= block.block_id < num_blocks:
            broken("a key the manager does not hold", key)
        if block.ref_cnt != 0:
            broken("a block that is not idle (ref_cnt != 0)", key)
        if key in protected:
            broken("a key that is protected or named twice", key)
        protected.add(key)


def is_none(block: object) -> bool:
    return block is None


def check_new_keys(keys: list[Any]) -> None:
    """New keys are exactly ``bytes``/``int`` and each is named once (in that order)."""
    if not set(map(type, keys)) <= KEY_TYPES:
        for key in keys:
            if type(key) not in KEY_TYPES:
                raise InvalidKeyError(
                    f"prepare_store: block key {key!r} has type {type(key).__name__}; "
                    "keys must be bytes or int"
                )
    if len(set(keys)) != len(keys):
        seen: set[Key] = set()
        for key in keys:
            if key in seen:
                raise InvalidKeyError(
                    f"prepare_store: block key {key!r} is named twice in one call"
                )
            seen.add(key)
