"""What the block allocator hands back: block tables, plans and offload items.

The values of :class:`~kvactors.paged.allocator.BlockAllocator`'s calls (see its
module docstring for the contract each belongs to), plus the per-request state a
:class:`BlockTable` is a live view of.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeAlias

import msgspec

from kvactors.errors import PagedCacheError

__all__ = [
    "AllocationPlan",
    "AllocatorStats",
    "BlockTable",
    "ExtendPlan",
    "MemoryPressure",
    "OffloadItem",
    "PrefixMatch",
    "Request",
    "RequestId",
    "RestoreTargets",
]

RequestId: TypeAlias = str | int


class MemoryPressure(msgspec.Struct, frozen=True):
    """Passed to pressure callbacks: fewer than ``watermark`` blocks are reusable
    without losing data (``num_empty`` empty + ``num_clean`` cached and offloaded)."""

    num_empty: int
    num_clean: int
    num_cached: int
    watermark: int


class OffloadItem(msgspec.Struct, frozen=True):
    """One offload block to store under ``key``: blocks ``block_ids`` in sequence order.

    ``hashes[i]`` is the key block ``i`` is registered under (``None`` for a
    partial or unregistered block). ``block_ids`` is valid until the caller's next
    call on the allocator; copy the bytes out before that.
    """

    key: bytes
    block_ids: list[int]
    hashes: list[bytes | None]


class PrefixMatch(msgspec.Struct, frozen=True):
    """``num_resident_tokens`` leading tokens are in the pool; ``lookup_keys`` are the
    offload keys (in order) that could restore the blocks after them."""

    num_resident_tokens: int
    lookup_keys: list[bytes]


class ExtendPlan(msgspec.Struct, frozen=True):
    """What the caller must do after ``extend``, in this order: copy out ``evicted``,
    then copy block ``src`` to ``dst`` for each pair of ``copies`` (copy-on-write)."""

    evicted: list[OffloadItem]
    copies: list[tuple[int, int]]


class RestoreTargets(msgspec.Struct, frozen=True):
    """Loaded row ``rows[i]`` goes to block ``block_ids[i]``; rows number the
    ``restore_keys`` offload blocks as ``key_index * blocks_per_offload + block_in_chunk``."""

    rows: list[int]
    block_ids: list[int]


class AllocatorStats(msgspec.Struct, frozen=True):
    num_blocks: int
    used: int
    cached: int
    empty: int
    clean: int
    requests: int
    hit_blocks: int
    restored_blocks: int
    evicted_blocks: int
    dropped_blocks: int
    pressure_events: int


class Request:
    """One request's tokens, blocks and restore state (the allocator's own)."""

    __slots__ = ("blocks", "freed", "hashes", "pending", "request_id", "tokens", "valid")

    def __init__(self, request_id: RequestId, tokens: list[int]) -> None:
        self.request_id = request_id
        self.tokens = tokens
        self.blocks: list[int] = []
        self.hashes: list[bytes] = []  # keys of the full blocks, registered or not
        self.pending: list[tuple[int, int]] | None = None  # (table index, row) of a restore
        self.valid = 0  # leading blocks whose bytes came from the cache, not this request
        self.freed = False


class BlockTable:
    """A live view of one request's block table.

    Follows the request through ``extend``, copy-on-write and ``defragment``.
    Any use after the request was freed raises :class:`~kvactors.errors.PagedCacheError`.
    """

    __slots__ = ("_req",)

    def __init__(self, req: Request) -> None:
        self._req = req

    def _live(self) -> Request:
        if self._req.freed:
            raise PagedCacheError(
                f"block table of request {self._req.request_id!r} used after the request was freed"
            )
        return self._req

    @property
    def request_id(self) -> RequestId:
        return self._req.request_id

    @property
    def block_ids(self) -> list[int]:
        """The block ids in sequence order (a copy)."""
        return list(self._live().blocks)

    @property
    def num_tokens(self) -> int:
        return len(self._live().tokens)

    def __len__(self) -> int:
        return len(self._live().blocks)

    def __getitem__(self, index: int) -> int:
        return self._live().blocks[index]

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._live().blocks))

    def __repr__(self) -> str:
        state = "freed" if self._req.freed else f"blocks={self._req.blocks}"
        return f"BlockTable(request_id={self._req.request_id!r}, {state})"


class AllocationPlan(msgspec.Struct, frozen=True):
    """What ``allocate`` decided.

    ``num_cached_tokens`` leading tokens need no compute: the first
    ``num_shared_tokens`` are shared blocks of the pool, the rest are restored
    once the restore completes; the engine computes the others. The caller
    copies out ``evicted`` first, then (if ``restore_keys``) loads those offload
    blocks and calls ``complete_restore``.
    """

    block_table: BlockTable
    num_cached_tokens: int
    num_shared_tokens: int
    restore_keys: list[bytes]
    evicted: list[OffloadItem]
