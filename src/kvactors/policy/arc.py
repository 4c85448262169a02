"""Adaptive Replacement Cache: a recency list and a frequency list that trade space.

T1 holds blocks seen once, T2 blocks seen again; the ghost lists B1/B2 remember
keys recently evicted from each (no data, trimmed to ``capacity``, oldest first).
A hit in B1 means T1 was too small, so the float ``target`` size of T1 grows;
a hit in B2 shrinks it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Iterable, Iterator, Sequence
from typing import ClassVar

from kvactors.keys import Key
from kvactors.policy._base import BlockStatus, HeldKeys, checked_capacity


class ARCPolicy(HeldKeys):
    """ARC with vLLM's semantics, made atomic.

    - ``insert`` puts a key in T1 (and out of the ghost lists).
    - ``touch`` walks keys in reverse: a ready T1 block moves to T2, a T1 block
      still being written to T1's most-recent end; a T2 block moves to its
      most-recent end; a B1 hit raises ``target`` by
      ``max(1, |B2|/|B1|)`` (capped at capacity); a B2 hit lowers it by
      ``max(1, |B1|/|B2|)`` (floored at 0). Ghost hits refresh the ghost entry.
    - ``evict(n)`` takes from T1 while ``|T1| >= int(target)``, else from T2,
      falling back to the other list when one has no eligible block. Victims go
      to B1/B2 only once all ``n`` are found, so ``None`` changes nothing.
    """

    name: ClassVar[str] = "arc"

    def __init__(self, capacity: int) -> None:
        """Raises :class:`~kvactors.errors.ConfigError` for a ``capacity`` that is
        not an ``int >= 0``."""
        self.capacity = checked_capacity(capacity, 0)
        self.target = 0.0
        self.t1: OrderedDict[Key, BlockStatus] = OrderedDict()
        self.t2: OrderedDict[Key, BlockStatus] = OrderedDict()
        self.b1: OrderedDict[Key, None] = OrderedDict()
        self.b2: OrderedDict[Key, None] = OrderedDict()
        # key -> block for both resident lists, so ``get`` is one C call.
        self._blocks: dict[Key, BlockStatus] = {}
        self.get = self._blocks.get

    def insert(self, key: Key, block: BlockStatus) -> None:
        self.b1.pop(key, None)
        self.b2.pop(key, None)
        self.t1[key] = block
        self._blocks[key] = block

    def insert_many(self, items: Iterable[tuple[Key, BlockStatus]]) -> None:
        for key, block in items:
            self.insert(key, block)

    def remove(self, key: Key) -> None:
        del self._blocks[key]
        if self.t1.pop(key, None) is None:
            del self.t2[key]

    def touch(self, keys: Sequence[Key]) -> None:
        t1, t2, b1, b2 = self.t1, self.t2, self.b1, self.b2
        for key in reversed(keys):
            block = t1.get(key)
            if block is not None:
                if block.ref_cnt >= 0:
                    del t1[key]
                    t2[key] = block
                else:
                    # A block still being written was only just inserted, not
                    # used twice: it stays in T1, at its most recent end.
                    t1.move_to_end(key)
            elif key in t2:
                t2.move_to_end(key)
            elif key in b1:
                delta = max(1.0, len(b2) / len(b1))
                self.target = min(self.target + delta, float(self.capacity))
                b1.move_to_end(key)
            elif key in b2:
                delta = max(1.0, len(b1) / len(b2))
                self.target = max(self.target - delta, 0.0)
                b2.move_to_end(key)

    def _eligible(
        self, lst: OrderedDict[Key, BlockStatus], protected: Container[Key]
    ) -> Iterator[tuple[Key, BlockStatus]]:
        for key, block in lst.items():
            if block.ref_cnt == 0 and key not in protected:
                yield key, block

    def evict(self, n: int, protected: Container[Key]) -> list[tuple[Key, BlockStatus]] | None:
        if n <= 0:
            return []
        from_t1 = self._eligible(self.t1, protected)
        from_t2 = self._eligible(self.t2, protected)
        t1_left = len(self.t1)
        target = int(self.target)
        victims: list[tuple[Key, BlockStatus, bool]] = []  # (key, block, was_in_t1)
        for _ in range(n):
            first, second = (from_t1, from_t2) if t1_left >= target else (from_t2, from_t1)
            pick = next(first, None)
            in_t1 = first is from_t1
            if pick is None:
                pick = next(second, None)
                in_t1 = not in_t1
                if pick is None:
                    return None
            if in_t1:
                t1_left -= 1
            victims.append((pick[0], pick[1], in_t1))
        t1, t2, b1, b2, all_ = self.t1, self.t2, self.b1, self.b2, self._blocks
        for key, _, in_t1 in victims:
            del all_[key]
            if in_t1:
                del t1[key]
                b1[key] = None
            else:
                del t2[key]
                b2[key] = None
        for ghost in (b1, b2):
            for _ in range(len(ghost) - self.capacity):
                ghost.popitem(last=False)
        return [(key, block) for key, block, _ in victims]

    def order_state(self) -> tuple[object, ...]:
        """``("arc", target, T1, T2, B1, B2)``, each list least recent first: the
        order data the compiled core's ``arc`` entry reports too."""
        lists = [list(lst) for lst in (self.t1, self.t2, self.b1, self.b2)]
        return ("arc", self.target, *lists)
