"""Least recently used: one ordered map, least recent first."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Iterator, Sequence
from typing import ClassVar

from kvactors.policy._base import BlockStatus, Key


class LRUPolicy:
    """Plain LRU.

    ``insert`` appends at the most-recent end; ``touch(keys)`` walks the keys in
    reverse and moves each present key to the most-recent end, so the first key
    ends most recent (a prefix's head outlives its tail). Completing a store or a
    load does not reorder. ``evict`` scans from the least-recent end, skipping
    pinned, being-written and protected blocks.
    """

    name: ClassVar[str] = "lru"

    def __init__(self, capacity: int = 0) -> None:
        # capacity is unused by LRU; accepted so every policy is built alike.
        self._blocks: OrderedDict[Key, BlockStatus] = OrderedDict()
        # Bound C methods: the manager's hot loops call these once per key.
        self.get = self._blocks.get

    def insert(self, key: Key, block: BlockStatus) -> None:
        self._blocks[key] = block

    def remove(self, key: Key) -> None:
        del self._blocks[key]

    def touch(self, keys: Sequence[Key]) -> None:
        blocks = self._blocks
        move = blocks.move_to_end
        for key in reversed(keys):
            if key in blocks:
                move(key)

    def evict(self, n: int, protected: Container[Key]) -> list[tuple[Key, BlockStatus]] | None:
        if n <= 0:
            return []
        victims: list[tuple[Key, BlockStatus]] = []
        for key, block in self._blocks.items():
            if block.ref_cnt == 0 and key not in protected:
                victims.append((key, block))
                if len(victims) == n:
                    break
        else:
            return None
        blocks = self._blocks
        for key, _ in victims:
            del blocks[key]
        return victims

    def keys(self) -> Iterator[Key]:
        return iter(self._blocks)

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: object) -> bool:
        return key in self._blocks
