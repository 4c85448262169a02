"""Weighted LRU: recency aged by access frequency and block size (GreedyDual-Size-Frequency).

Each block has a priority ``H = L + frequency ** frequency_weight / size ** size_weight``,
where ``L`` (the clock) rises to the priority of each block evicted. The block
with the lowest ``H`` leaves first; ties go to the least recently used. So:

- a block used often keeps a high ``H`` long after its last use, but the clock
  catches up with it once it stops being used (no permanent squatters);
- with ``size_weight > 0`` large blocks are cheaper to evict per byte freed;
- with both weights 0 it is plain LRU.

Defaults: ``frequency_weight=1`` (a block used ``k`` times outlives ``k - 1``
evictions' worth of clock), ``size_weight=1`` (priority per unit of size, as in
GDSF; uniform blocks make it irrelevant). Pick it when a few shared prefixes
(system prompts, few-shot headers) are reused far more than the rest.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Container, Iterable, Sequence
from itertools import count
from typing import ClassVar

from kvactors.errors import ConfigError
from kvactors.keys import Key
from kvactors.policy._base import BlockStatus, HeldKeys, checked_capacity


def _finite(value: object) -> bool:
    """An ``int`` or ``float`` (not a bool) that a float holds, finite."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


class WeightedLRUPolicy(HeldKeys):
    """GDSF ordering with lazily invalidated heap entries (``evict`` is O(k log n))."""

    name: ClassVar[str] = "weighted_lru"

    def __init__(
        self, capacity: int = 0, *, frequency_weight: float = 1.0, size_weight: float = 1.0
    ) -> None:
        """Raises :class:`~kvactors.errors.ConfigError` naming a weight that is not a
        finite ``int`` or ``float`` (a string, ``None``, a bool, NaN, infinity, an
        int past a float's range), and for a ``capacity`` that is not an ``int >= 0``."""
        capacity = checked_capacity(capacity, 0)
        for field, weight in (("frequency_weight", frequency_weight), ("size_weight", size_weight)):
            if not _finite(weight):
                raise ConfigError(f"{field} must be a finite number, got {weight!r}")
        self.capacity = capacity
        self.frequency_weight = frequency_weight
        self.size_weight = size_weight
        self.clock = 0.0
        self._blocks: dict[Key, BlockStatus] = {}
        self._freq: dict[Key, int] = {}
        self._prio: dict[Key, tuple[float, int]] = {}
        self._heap: list[tuple[float, int, Key]] = []
        self._seq = count()
        self.get = self._blocks.get

    def _weight(self, freq: int, size: int) -> float:
        """``freq ** frequency_weight / size ** size_weight``; where that passes a
        float's range (large weights, many uses), the same value from logarithms,
        saturated: ``inf`` above a float's range, ``0.0`` below it."""
        try:
            return float(freq**self.frequency_weight / size**self.size_weight)
        except (OverflowError, ZeroDivisionError):
            exponent = self.frequency_weight * math.log(freq) - self.size_weight * math.log(size)
            try:
                return math.exp(exponent)
            except OverflowError:
                return math.inf

    def _push(self, key: Key, block: BlockStatus) -> None:
        weight = self._weight(self._freq[key], max(block.size, 1))
        entry = (self.clock + weight, next(self._seq))
        self._prio[key] = entry
        heapq.heappush(self._heap, (entry[0], entry[1], key))
        if len(self._heap) > 2 * len(self._blocks) + 64:
            self._heap = [(p, s, k) for k, (p, s) in self._prio.items()]
            heapq.heapify(self._heap)

    def insert(self, key: Key, block: BlockStatus) -> None:
        self._blocks[key] = block
        self._freq[key] = 1
        self._push(key, block)

    def insert_many(self, items: Iterable[tuple[Key, BlockStatus]]) -> None:
        for key, block in items:
            self.insert(key, block)

    def remove(self, key: Key) -> None:
        del self._blocks[key]
        del self._freq[key]
        del self._prio[key]  # its heap entries are now stale

    def touch(self, keys: Sequence[Key]) -> None:
        blocks = self._blocks
        freq = self._freq
        for key in reversed(keys):
            block = blocks.get(key)
            if block is not None:
                freq[key] += 1
                self._push(key, block)

    def evict(self, n: int, protected: Container[Key]) -> list[tuple[Key, BlockStatus]] | None:
        if n <= 0:
            return []
        heap = self._heap
        prio = self._prio
        victims: list[tuple[float, int, Key]] = []
        kept: list[tuple[float, int, Key]] = []
        while heap and len(victims) < n:
            entry = heapq.heappop(heap)
            p, s, key = entry
            if prio.get(key) != (p, s):
                continue  # stale: the key was touched again or removed
            if self._blocks[key].ref_cnt == 0 and key not in protected:
                victims.append(entry)
            else:
                kept.append(entry)
        for entry in kept:
            heapq.heappush(heap, entry)
        if len(victims) < n:
            for entry in victims:
                heapq.heappush(heap, entry)
            return None
        out: list[tuple[Key, BlockStatus]] = []
        for p, _, key in victims:
            out.append((key, self._blocks.pop(key)))
            del self._freq[key]
            del prio[key]
            self.clock = max(self.clock, p)
        return out

    def order_state(self) -> tuple[object, ...]:
        """``("weighted_lru", clock, {key: (priority, frequency)})``: the order
        data the compiled core's ``weighted_lru`` entry reports too."""
        live = {key: (self._prio[key][0], self._freq[key]) for key in self._blocks}
        return ("weighted_lru", self.clock, live)
