"""What every eviction policy shares: the block record and the ``CachePolicy`` protocol."""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator, Sequence
from typing import ClassVar, Protocol, TypeAlias, runtime_checkable

Key: TypeAlias = bytes | int
"""A block key. Stable across processes: a chained hash as ``bytes`` or ``int``."""


class BlockStatus:
    """One block of one tier: its slot id and its reference count.

    ``ref_cnt`` is ``-1`` while the block is being written (not readable, not
    evictable), ``0`` when idle (evictable) and ``n > 0`` while ``n`` readers hold it.
    ``size`` is the block's weight for size-aware policies (1 for uniform blocks).
    """

    __slots__ = ("block_id", "ref_cnt", "size")

    def __init__(self, block_id: int, ref_cnt: int = -1, size: int = 1) -> None:
        self.block_id = block_id
        self.ref_cnt = ref_cnt
        self.size = size

    @property
    def is_ready(self) -> bool:
        return self.ref_cnt >= 0

    def __repr__(self) -> str:
        return f"BlockStatus(block_id={self.block_id}, ref_cnt={self.ref_cnt})"


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
