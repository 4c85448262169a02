"""Restoring the Python manager from what a tier holds on disk: ``(key, slot)``
pairs, or every entry of an NVMe tier's index.

:class:`Restore` is that part of
:class:`~kvactors.manager._reference.OffloadingManager` (a base whose state it
uses); the compiled core's manager overrides both methods.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from kvactors.errors import BlockStateError, InvalidKeyError
from kvactors.keys import Key
from kvactors.manager._contract import KEY_TYPES, key_tuple
from kvactors.policy._base import BlockStatus, CachePolicy

if TYPE_CHECKING:
    from kvactors.media.nvme_index import NVMeIndex

__all__ = ["Restore", "check_index"]


def check_index(index: object) -> None:
    """``index`` is an NVMe index (the same error on both cores otherwise)."""
    from kvactors.media.nvme_index import NVMeIndex

    if not isinstance(index, NVMeIndex):
        raise InvalidKeyError(f"restore_index: expected an NVMeIndex, got {type(index).__name__}")


class Restore:
    """:meth:`restore` and :meth:`restore_index` of the Python manager."""

    num_blocks: int
    block_size: int
    medium: str
    _policy: CachePolicy
    _next_fresh: int
    _free_list: list[int]
    _stack_first: bool

    def restore(self, blocks: Iterable[tuple[Key, int]]) -> list[Key]:
        """Load ``(key, slot id)`` pairs found on disk into an empty manager, as ready.

        They enter in the given order (oldest first, for recency). The whole
        call is checked first: an item that is not a ``(key, slot id)`` pair or
        a slot id that is not an ``int`` raises
        :class:`~kvactors.errors.InvalidKeyError` with nothing restored. Pairs
        with a key that is not ``bytes``/``int``, an out-of-range slot, or a
        slot or key already restored are skipped; the keys restored are
        returned. Free slots are then handed out lowest first. Raises
        :class:`~kvactors.errors.BlockStateError` if the manager is not empty.
        """
        if len(self._policy) or self._next_fresh or self._free_list:
            raise BlockStateError(f"restore: the {self.medium} manager is not empty")
        pairs = key_tuple("restore", blocks)
        for k, pair in enumerate(pairs):
            if type(pair) not in (tuple, list) or len(pair) != 2:
                raise InvalidKeyError(f"restore: item {k} is not a (key, slot id) pair: {pair!r}")
            if type(pair[1]) is not int:
                raise InvalidKeyError(
                    f"restore: slot id {pair[1]!r} of key {pair[0]!r} is not an int"
                )
        used: set[int] = set()
        restored: list[Key] = []
        policy = self._policy
        size = self.block_size
        for key, block_id in pairs:
            if type(key) not in KEY_TYPES or not 0 <= block_id < self.num_blocks:
                continue
            if block_id in used or policy.get(key) is not None:
                continue
            used.add(block_id)
            policy.insert(key, BlockStatus(block_id, 0, size))
            restored.append(key)
        # Free slots lowest first: the holes below the highest restored slot
        # (lowest on top), then the fresh ids above it in order.
        high = max(used, default=-1)
        self._next_fresh = high + 1
        self._free_list = [i for i in range(high, -1, -1) if i not in used]
        self._stack_first = True
        return restored

    def restore_index(self, index: NVMeIndex) -> int:
        """:meth:`restore` from every entry of an NVMe tier's index (oldest
        first); returns how many entries were restored.

        Into an empty manager, as :meth:`restore` does with the index's
        ``(key, slot)`` pairs. The compiled core restores straight from the
        index's compiled table, with no object per entry, and from then on
        reads the keys of the slots the index records from that table rather
        than keeping its own copy (a slot's key is copied out before the index
        changes its record); its answers stay the same.
        """
        check_index(index)
        return len(self.restore((e.key, e.slot) for e in index.entries()))
