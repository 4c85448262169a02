"""Least recently used: one ordered map, least recent first."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Container, Iterable, Iterator, Sequence
from itertools import compress, filterfalse, islice
from operator import attrgetter, not_
from typing import ClassVar

from kvactors.keys import Key
from kvactors.policy._base import BlockStatus, HeldKeys, checked_capacity

_REF_CNT = attrgetter("ref_cnt")


def _drain(it: Iterator[object]) -> None:
    deque(it, maxlen=0)


class LRUPolicy(HeldKeys):
    """Plain LRU.

    ``insert`` appends at the most-recent end; ``touch(keys)`` walks the keys in
    reverse and moves each present key to the most-recent end, so the first key
    ends most recent (a prefix's head outlives its tail). Completing a store or a
    load does not reorder. ``evict`` scans from the least-recent end, skipping
    pinned, being-written and protected blocks.
    """

    name: ClassVar[str] = "lru"

    def __init__(self, capacity: int = 0) -> None:
        # capacity is unused by LRU; accepted (and checked) so every policy is built alike.
        checked_capacity(capacity, 0)
        self._blocks: OrderedDict[Key, BlockStatus] = OrderedDict()
        # Bound C methods: the manager's hot loops call these once per key.
        self.get = self._blocks.get

    def insert(self, key: Key, block: BlockStatus) -> None:
        self._blocks[key] = block

    def insert_many(self, items: Iterable[tuple[Key, BlockStatus]]) -> None:
        self._blocks.update(items)

    def remove(self, key: Key) -> None:
        del self._blocks[key]

    def touch(self, keys: Sequence[Key]) -> None:
        blocks = self._blocks
        # for key in reversed(keys): if key in blocks: move_to_end(key), run in C.
        _drain(map(blocks.move_to_end, filter(blocks.__contains__, reversed(keys))))

    def evict(self, n: int, protected: Container[Key]) -> list[tuple[Key, BlockStatus]] | None:
        if n <= 0:
            return []
        blocks = self._blocks
        # Least recent first: the idle keys (``not ref_cnt`` is ref 0) that are not
        # protected, the first n of them. One C pipeline, no Python frame per block.
        idle = compress(blocks, map(not_, map(_REF_CNT, blocks.values())))
        victims = list(islice(filterfalse(protected.__contains__, idle), n))
        if len(victims) < n:
            return None
        return list(zip(victims, map(blocks.pop, victims)))

    def order_state(self) -> tuple[object, ...]:
        """``("lru", [keys, least recent first])``: the order data the compiled
        core's ``lru`` entry reports too (the differential tests compare them)."""
        return ("lru", list(self._blocks))
