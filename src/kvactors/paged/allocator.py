"""The block allocator: the synchronous core of the paged KV cache.

Every block of the pool is empty, referenced (in a request's block table) or
cached (idle, holding a full block whose key is known); see
:mod:`kvactors.paged.block_pool`.

Requests ``allocate``, ``extend``, ``fork`` and ``free``. A full block is keyed by
the chained hash of its tokens (:mod:`kvactors.paged.hashing`); the first request
to fill a block with a given key registers it, and later requests with the same
prefix share it (ref + 1). A block is released when its last user frees it.

**Contract.** The engine writes the KV of the tokens it allocates (or extends
by) before the next call that can share them: a block is registered, and so
shareable, as soon as it is allocated full. A request aborted before its tokens
were computed is freed with ``free(request_id, computed=False)``.

Offloading is planned by :mod:`kvactors.paged.offload_planner` (evicted
blocks, ``prepare_offload``, ``prepare_swap_out``, restores) over the block
states of :mod:`kvactors.paged.block_pool`; nothing here does I/O.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Mapping, Sequence
from collections.abc import Set as AbstractSet

from kvactors.errors import OutOfBlocksError, PagedCacheError
from kvactors.paged.block_pool import cdiv
from kvactors.paged.config import KVCacheConfig
from kvactors.paged.hashing import checked_token_ids, hash_blocks, root_key
from kvactors.paged.offload_planner import OffloadPlanner
from kvactors.paged.plans import (
    AllocationPlan,
    AllocatorStats,
    BlockTable,
    ExtendPlan,
    MemoryPressure,
    OffloadItem,
    PrefixMatch,
    Request,
    RequestId,
    RestoreTargets,
)

__all__ = [
    "AllocationPlan",
    "AllocatorStats",
    "BlockAllocator",
    "BlockTable",
    "ExtendPlan",
    "MemoryPressure",
    "OffloadItem",
    "PrefixMatch",
    "RequestId",
    "RestoreTargets",
]


def _key_set(offloaded: object) -> AbstractSet[bytes]:
    """``allocate``'s ``offloaded`` as a set; PagedCacheError for what is not a
    collection of offload keys (an int, a str, a list of lists)."""
    if not isinstance(offloaded, (str, bytes, bytearray)):
        try:
            return set(offloaded)  # type: ignore[call-overload,no-any-return]
        except TypeError:
            pass
    raise PagedCacheError(
        f"allocate: offloaded must be a collection of offload keys (bytes), "
        f"got {type(offloaded).__name__}"
    )


class BlockAllocator(OffloadPlanner):
    """Allocates the blocks of a pool of ``num_blocks`` blocks of ``block_size`` tokens.

    ``offloading=True`` turns on the offload planning (``evicted`` items, clean
    blocks, ``prepare_offload``); without it evicted blocks are simply dropped.
    ``watermark_blocks``: below that many reusable blocks (empty, or cached and
    clean) the allocator is under pressure and runs the pressure callbacks after
    each ``allocate`` and ``extend``. ``root`` is the parent key of every
    sequence's first block (see :func:`~kvactors.paged.hashing.root_key`).
    """

    @classmethod
    def from_config(cls, config: KVCacheConfig, *, offloading: bool = False) -> BlockAllocator:
        """An allocator for ``config``'s pool, keys rooted at ``root_key(config)``."""
        return cls(
            config.num_gpu_blocks,
            config.block_size,
            blocks_per_offload=config.blocks_per_offload,
            watermark_blocks=config.watermark_blocks,
            offloading=offloading,
            root=root_key(config),
        )

    # -- queries --------------------------------------------------------------------

    def get_block_table(self, request_id: RequestId) -> BlockTable:
        """The live block table of ``request_id``; PagedCacheError if it is unknown."""
        return BlockTable(self._get(request_id, "get_block_table"))

    def request_ids(self) -> list[RequestId]:
        return list(self._requests)

    # -- request lifecycle ----------------------------------------------------------

    def _check_fits(self, request_id: RequestId, num_blocks: int, what: str) -> None:
        if num_blocks > self.num_blocks:
            raise PagedCacheError(
                f"{what}: request {request_id!r} needs {num_blocks} blocks, "
                f"the pool has {self.num_blocks} in all"
            )

    def _limits(self, num_tokens: int, compute_last: bool) -> tuple[int, int]:
        """Blocks that may be shared (resident) and restored at most."""
        if compute_last:
            limit = (num_tokens - 1) // self.block_size
            return limit, limit
        return num_tokens // self.block_size, cdiv(num_tokens, self.block_size)

    def _resident_run(self, hashes: list[bytes], limit: int) -> int:
        r = 0
        by_key = self._by_key
        while r < limit and hashes[r] in by_key:
            r += 1
        return r

    def match(self, token_ids: Sequence[int], *, compute_last: bool = True) -> PrefixMatch:
        """How much of ``token_ids`` is in the pool, and which offload keys to look up.

        ``compute_last=True`` (a new prompt): the last token is never served from
        the cache, so the engine computes it and gets its logits.
        ``compute_last=False`` (swap-in): every token may be served, the tail too.
        """
        tokens = self._tokens(token_ids, "match")
        hashes = hash_blocks(self.root, tokens, self.block_size)
        share_limit, restore_limit = self._limits(len(tokens), compute_last)
        r = self._resident_run(hashes, share_limit)
        keys = [
            key
            for key, first, stop in self._segments(tokens, hashes, tail=not compute_last)
            if max(first, r) < min(stop, restore_limit)  # some block it could restore
        ]
        return PrefixMatch(min(len(tokens), r * self.block_size), keys)

    def _tokens(self, token_ids: Sequence[int], what: str) -> list[int]:
        # A sequence has an order and a length: a set, a mapping or an iterator is not one.
        tokens: list[int] | None = None
        if type(token_ids) is list or (
            not isinstance(token_ids, AbstractSet | Mapping)
            and hasattr(token_ids, "__len__")
            and hasattr(token_ids, "__getitem__")
        ):
            try:
                tokens = list(token_ids)
            except TypeError:  # (not contextlib.suppress: this runs on every decode step)
                tokens = None
        if tokens is None:
            kind = type(token_ids).__name__
            raise PagedCacheError(f"{what}: token ids must be a sequence of ints, got {kind}")
        if len(tokens) == 1 and type(tokens[0]) is int and -(2**63) <= tokens[0] < 2**63:
            return tokens  # one decoded token: the common case, checked without packing
        try:
            ints = checked_token_ids(tokens)  # numpy / torch integers as ints
        except PagedCacheError as exc:
            raise PagedCacheError(f"{what}: {exc}") from None
        return list(ints) if ints is not tokens else tokens

    def _new_request(self, request_id: RequestId, token_ids: Sequence[int]) -> list[int]:
        """``token_ids`` as a list, checked as ``allocate`` checks a new request
        (PagedCacheError: the id exists, a bad token id, no tokens, more blocks than the pool)."""
        if self._known(request_id, "allocate"):
            raise PagedCacheError(f"allocate: request {request_id!r} is already allocated")
        tokens = self._tokens(token_ids, "allocate")
        if not tokens:
            raise PagedCacheError(f"allocate: request {request_id!r} has no tokens")
        self._check_fits(request_id, cdiv(len(tokens), self.block_size), "allocate")
        return tokens

    def allocate(
        self,
        request_id: RequestId,
        token_ids: Sequence[int],
        *,
        offloaded: Collection[bytes] = (),
        compute_last: bool = True,
    ) -> AllocationPlan:
        """Give a new request the blocks for ``token_ids``, sharing its cached prefix.

        ``offloaded``: offload keys known to be in the offload store (from
        ``match`` and a lookup); blocks after the shared prefix whose offload
        block is among them are planned for restore (``plan.restore_keys``); the
        caller loads them and calls ``complete_restore``. ``compute_last``: see
        :meth:`match`.

        Raises :class:`~kvactors.errors.PagedCacheError` if the request exists,
        has no tokens, a token id is not an int64, ``offloaded`` is not a
        collection of keys or it needs more blocks than the pool has;
        :class:`~kvactors.errors.OutOfBlocksError` if not enough blocks are free now.
        On any error nothing changed.
        """
        tokens = self._new_request(request_id, token_ids)
        if not isinstance(offloaded, AbstractSet):
            offloaded = _key_set(offloaded)
        bs = self.block_size
        total = cdiv(len(tokens), bs)
        hashes = hash_blocks(self.root, tokens, bs)
        share_limit, restore_limit = self._limits(len(tokens), compute_last)
        r = self._resident_run(hashes, share_limit)
        restore: list[tuple[int, int]] = []  # (table index, row)
        restore_keys: list[bytes] = []
        if offloaded:
            restore, restore_keys = self._plan_restore(
                tokens, hashes, r, restore_limit, offloaded, compute_last
            )
        hits = [self._by_key[h] for h in hashes[:r]]
        idle_hits = sum(1 for b in hits if self._ref[b] == 0)
        needed = total - r
        if needed > self.num_free_blocks() - idle_hits:
            raise OutOfBlocksError(
                f"allocate: request {request_id!r} needs {needed} new blocks, "
                f"{self.num_free_blocks() - idle_hits} are free"
            )
        # Commit: nothing below can fail.
        for b in hits:
            self._acquire(b)
        self._hit_blocks += r
        fresh, evicted = self._take(needed)
        req = Request(request_id, tokens)
        req.blocks = hits + fresh
        req.hashes = hashes
        req.valid = r
        restoring = {i for i, _ in restore}
        for i in range(r, len(hashes)):
            if i not in restoring:
                self._register(req, i)
        if restore:
            req.pending = restore
        self._requests[request_id] = req
        if needed or idle_hits:  # it took blocks (shared only held ones otherwise)
            self._check_pressure()
        cached = min(len(tokens), (r + len(restore)) * bs)
        shared = min(len(tokens), r * bs)
        return AllocationPlan(BlockTable(req), cached, shared, restore_keys, evicted)

    def complete_restore(self, request_id: RequestId, success: bool) -> RestoreTargets:
        """Finish the restore ``allocate`` planned for ``request_id``; where its rows go.

        On success the restored blocks count as cached (and clean); on failure
        the engine computes them like any new block (``num_cached_tokens`` of the
        plan no longer holds: only the shared prefix is cached). Raises
        PagedCacheError if the request is unknown or has no restore in flight.
        """
        req = self._get(request_id, "complete_restore")
        success = self._success(success, "complete_restore")
        if req.pending is None:
            raise PagedCacheError(
                f"complete_restore: request {request_id!r} has no restore in flight"
            )
        pending, req.pending = req.pending, None
        for i, _ in pending:
            if i < len(req.hashes):
                self._register(req, i)
                b = req.blocks[i]
                if success and self._key[b] is not None:
                    self._clean[b] = True
        if success:
            req.valid = pending[-1][0] + 1
            self._restored_blocks += len(pending)
        return RestoreTargets([row for _, row in pending], [req.blocks[i] for i, _ in pending])

    def extend(self, request_id: RequestId, token_ids: Sequence[int]) -> ExtendPlan:
        """Append ``token_ids`` to a request, adding blocks as needed.

        If the request's partial last block is shared (after ``fork``), it is
        copied first (``plan.copies``). Raises PagedCacheError for an unknown
        request, a bad token id or a request that would outgrow the pool;
        OutOfBlocksError if not enough blocks are free now. On error nothing changed.
        """
        req = self._idle(request_id, "extend")
        new = self._tokens(token_ids, "extend")
        if not new:
            return ExtendPlan([], [])
        bs = self.block_size
        old_len = len(req.tokens)
        total = cdiv(old_len + len(new), bs)
        self._check_fits(request_id, total, "extend")
        cow = old_len % bs != 0 and self._ref[req.blocks[-1]] > 1
        needed = total - len(req.blocks) + int(cow)
        if needed > len(self._empty) + len(self._lru):
            raise OutOfBlocksError(
                f"extend: request {request_id!r} needs {needed} new blocks, "
                f"{self.num_free_blocks()} are free"
            )
        req.valid = len(req.blocks)  # the engine computed what it had before extending
        req.tokens += new
        if not needed and (old_len + len(new)) // bs == len(req.hashes):
            return ExtendPlan([], [])  # decode inside the last block: nothing else changes
        fresh, evicted = self._take(needed)
        copies: list[tuple[int, int]] = []
        if cow:
            old = req.blocks[-1]
            copy = fresh.pop(0)
            copies.append((old, copy))
            self._ref[old] -= 1  # still > 0: another request holds it
            req.blocks[-1] = copy
        req.blocks += fresh
        start = len(req.hashes)
        parent = req.hashes[-1] if req.hashes else self.root
        req.hashes += hash_blocks(parent, req.tokens, bs, start)
        for i in range(start, len(req.hashes)):
            self._register(req, i)
        if needed:
            self._check_pressure()
        return ExtendPlan(evicted, copies)

    def fork(self, parent_id: RequestId, child_id: RequestId) -> BlockTable:
        """A new request ``child_id`` sharing every block of ``parent_id``.

        The first of the two to extend a shared partial block gets a copy of it
        (copy-on-write, see :meth:`extend`). Raises PagedCacheError if the parent
        is unknown or the child exists.
        """
        parent = self._idle(parent_id, "fork")
        if self._known(child_id, "fork"):
            raise PagedCacheError(f"fork: request {child_id!r} is already allocated")
        child = Request(child_id, list(parent.tokens))
        child.blocks = list(parent.blocks)
        child.hashes = list(parent.hashes)
        child.valid = parent.valid
        for b in child.blocks:
            self._ref[b] += 1
        self._requests[child_id] = child
        return BlockTable(child)

    def free(self, request_id: RequestId, *, computed: bool = True) -> list[int]:
        """Release a request's blocks; return its token ids.

        Blocks no other request holds become cached (if registered) or empty.
        ``computed=False``: the engine never wrote the request's tokens (it was
        aborted first), so blocks it filled itself are dropped, not cached.
        Every :class:`BlockTable` of the request is dead afterwards. Raises
        PagedCacheError for an unknown request or one with a restore in flight.
        """
        req = self._idle(request_id, "free")
        del self._requests[request_id]
        req.freed = True
        # Last block first: a prefix's head outlives its tail in the LRU order.
        for i in range(len(req.blocks) - 1, -1, -1):
            b = req.blocks[i]
            self._ref[b] -= 1
            if self._ref[b]:
                continue
            if self._key[b] is not None and (computed or i < req.valid):
                self._lru[b] = None
                if self._clean[b]:
                    self._clean_cached += 1
            else:
                self._unregister(b)
                heapq.heappush(self._empty, b)
        return req.tokens
