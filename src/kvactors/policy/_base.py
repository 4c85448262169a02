"""What every eviction policy shares: the block record, the ``CachePolicy`` protocol
and the key queries over a policy's ``key -> block`` map."""

from __future__ import annotations

import operator
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from typing import ClassVar, Protocol, runtime_checkable

import msgspec

from kvactors.errors import ConfigError
from kvactors.keys import Key


def checked_capacity(capacity: object, minimum: int) -> int:
    """``capacity`` as an ``int`` if it is an integer (not a bool) of at least ``minimum``.

    Raises :class:`~kvactors.errors.ConfigError` naming ``capacity`` otherwise, when
    the policy is made (a policy given a wrong one used to fail in a later
    handshake, with a ``TypeError``, ``KeyError`` or ``StopIteration``).
    """
    try:
        value = operator.index(capacity)  # type: ignore[arg-type]
    except TypeError:
        value = None
    if value is None or isinstance(capacity, bool) or value < minimum:
        raise ConfigError(f"capacity: expected an int >= {minimum}, got {capacity!r}")
    return value


class BlockStatus(msgspec.Struct, eq=False, gc=False):
    """One block of one tier: its slot id and its reference count.

    ``ref_cnt`` is ``-1`` while the block is being written (not readable, not
    evictable), ``0`` when idle (evictable) and ``n > 0`` while ``n`` readers hold it.
    ``size`` is the block's weight for size-aware policies (1 for uniform blocks).

    A mutable struct built in C (a store creates one per block), compared by
    identity and never tracked by the garbage collector (it holds only ints).
    """

    block_id: int
    ref_cnt: int = -1
    size: int = 1

    @property
    def is_ready(self) -> bool:
        return self.ref_cnt >= 0


@runtime_checkable
class CachePolicy(Protocol):
    """Eviction order of one tier's blocks; no I/O, no ref counting, no slot ids.

    The manager owns ref counts and the block pool; a policy only remembers which
    keys it holds (``key -> BlockStatus``) and in what order they should leave.

    ``evict(n, protected)`` is atomic: it returns exactly ``n`` ``(key, block)``
    victims, already removed from the policy, or ``None`` with nothing changed.
    It never returns a block whose ``ref_cnt`` is not 0, nor a key in ``protected``.
    """

    name: ClassVar[str]

    def get(self, key: Key) -> BlockStatus | None: ...

    def insert(self, key: Key, block: BlockStatus) -> None: ...

    def insert_many(self, items: Iterable[tuple[Key, BlockStatus]]) -> None:
        """``insert`` each pair in order (one call for a whole store)."""
        ...

    def remove(self, key: Key) -> None: ...

    def touch(self, keys: Sequence[Key]) -> None: ...

    def evict(self, n: int, protected: Container[Key]) -> list[tuple[Key, BlockStatus]] | None: ...

    def keys(self) -> Iterator[Key]:
        """Every key held, in no promised order."""
        ...

    def __len__(self) -> int: ...

    def __contains__(self, key: object) -> bool: ...


class HeldKeys:
    """``keys``, ``__len__`` and ``__contains__`` of a policy that keeps every key
    it holds in one map, ``self._blocks`` (``key -> BlockStatus``)."""

    __slots__ = ()

    _blocks: Mapping[Key, BlockStatus]

    def keys(self) -> Iterator[Key]:
        """Every key held, in no promised order."""
        return iter(self._blocks)

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: object) -> bool:
        return key in self._blocks
