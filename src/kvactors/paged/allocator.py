"""The block allocator: the synchronous core of the paged KV cache.

Every block of the pool is in exactly one state:

- *empty*: holds nothing; handed out first, lowest id first;
- *referenced*: in the block table of ``ref_count(b) > 0`` requests;
- *cached*: idle (no request holds it) but it holds a full block whose key is
  known, so a later request with the same prefix shares it without recompute.
  Cached blocks are reused least recently used first when no empty block is left.

Requests ``allocate``, ``extend``, ``fork`` and ``free``. A full block is keyed by
the chained hash of its tokens (:mod:`kvactors.paged.hashing`); the first request
to fill a block with a given key registers it, and later requests with the same
prefix share it (ref + 1). A block is released when its last user frees it.

**Contract.** The engine writes the KV of the tokens it allocates (or extends
by) before the next call that can share them: a block is registered, and so
shareable, as soon as it is allocated full. A request aborted before its tokens
were computed is freed with ``free(request_id, computed=False)``.

**Offloading** is decided here and executed elsewhere (the async
:class:`~kvactors.paged.offload.PagedKVCache`), in the house's prepare/complete
style; nothing here does I/O:

- ``allocate`` and ``extend`` return the cached blocks they evicted that were
  not yet offloaded (``evicted``): their bytes are intact until the caller
  writes the blocks it got, so it copies them out first, then stores them.
- ``prepare_offload`` (memory pressure) and ``prepare_swap_out`` return blocks to
  store; ``complete_offload`` marks them offloaded (*clean*): a clean cached block
  is reused without a store.
- ``match`` names the keys to look up in the offload store; ``allocate`` given
  the keys found (``offloaded``) plans a restore, and ``complete_restore`` says
  where the loaded rows go.

With ``blocks_per_offload = k > 1`` one offload block packs the ``k`` blocks
``[c*k, c*k + k)`` of a sequence (a *chunk*), keyed by its last block's key. A
sequence's *tail* (its blocks after the last whole chunk, the partial block
included) is stored by ``prepare_swap_out`` under a tail key.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence

from kvactors.errors import OutOfBlocksError, PagedCacheError
from kvactors.paged.config import KVCacheConfig
from kvactors.paged.hashing import hash_blocks, hash_tail, pack_tokens, root_key
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


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockAllocator:
    """Allocates the blocks of a pool of ``num_blocks`` blocks of ``block_size`` tokens.

    ``offloading=True`` turns on the offload planning (``evicted`` items, clean
    blocks, ``prepare_offload``); without it evicted blocks are simply dropped.
    ``watermark_blocks``: below that many reusable blocks (empty, or cached and
    clean) the allocator is under pressure and runs the pressure callbacks after
    each ``allocate`` and ``extend``. ``root`` is the parent key of every
    sequence's first block (see :func:`~kvactors.paged.hashing.root_key`).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        blocks_per_offload: int = 1,
        watermark_blocks: int = 0,
        offloading: bool = False,
        root: bytes = b"",
    ) -> None:
        for name, value, low in (
            ("num_blocks", num_blocks, 1),
            ("block_size", block_size, 1),
            ("blocks_per_offload", blocks_per_offload, 1),
            ("watermark_blocks", watermark_blocks, 0),
        ):
            if type(value) is not int or value < low:
                raise PagedCacheError(f"{name}: expected an int >= {low}, got {value!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks_per_offload = blocks_per_offload
        self.watermark_blocks = watermark_blocks
        self.offloading = offloading
        self.root = root
        self._requests: dict[RequestId, Request] = {}
        self._empty = list(range(num_blocks))  # a heap: lowest id first
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached blocks, least recent first
        self._by_key: dict[bytes, int] = {}  # registered key -> block
        n = num_blocks
        self._ref = [0] * n
        self._key: list[bytes | None] = [None] * n  # registered key of each block
        self._parent: list[bytes] = [b""] * n  # key of the block before it
        self._depth = [0] * n  # its index in its sequence
        self._clean = [False] * n  # its bytes are in the offload store
        self._clean_cached = 0
        self._in_flight: set[bytes] = set()  # offload keys prepared, not completed
        self._callbacks: list[Callable[[MemoryPressure], None]] = []
        self._hit_blocks = 0
        self._restored_blocks = 0
        self._evicted_blocks = 0
        self._dropped_blocks = 0
        self._pressure_events = 0

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

    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now: empty ones and idle cached ones."""
        return len(self._empty) + len(self._lru)

    def usage(self) -> float:
        """Fraction of the pool held by requests (0.0 to 1.0)."""
        return (self.num_blocks - self.num_free_blocks()) / self.num_blocks

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a request of ``num_tokens`` tokens fits now, without counting prefix hits."""
        if type(num_tokens) is not int or num_tokens < 0:
            raise PagedCacheError(
                f"can_allocate: num_tokens must be an int >= 0, got {num_tokens!r}"
            )
        return _cdiv(num_tokens, self.block_size) <= self.num_free_blocks()

    def get_block_table(self, request_id: RequestId) -> BlockTable:
        """The live block table of ``request_id``; PagedCacheError if it is unknown."""
        return BlockTable(self._get(request_id, "get_block_table"))

    def request_ids(self) -> list[RequestId]:
        return list(self._requests)

    def _block(self, block_id: int) -> int:
        if type(block_id) is not int or not 0 <= block_id < self.num_blocks:
            raise PagedCacheError(f"block id {block_id!r} is out of range 0..{self.num_blocks - 1}")
        return block_id

    def ref_count(self, block_id: int) -> int:
        """How many block tables hold ``block_id``."""
        return self._ref[self._block(block_id)]

    def cached_blocks(self) -> list[int]:
        """Idle cached blocks, least recently used first."""
        return list(self._lru)

    def empty_blocks(self) -> list[int]:
        """Empty blocks, in ascending order."""
        return sorted(self._empty)

    def block_key(self, block_id: int) -> bytes | None:
        """The key ``block_id`` is registered under, or ``None``."""
        return self._key[self._block(block_id)]

    def is_clean(self, block_id: int) -> bool:
        """Whether the bytes of ``block_id`` are known to be in the offload store."""
        return self._clean[self._block(block_id)]

    def under_pressure(self) -> bool:
        """Fewer than ``watermark_blocks`` blocks are empty or cached and clean."""
        return len(self._empty) + self._clean_cached < self.watermark_blocks

    def stats(self) -> AllocatorStats:
        free = self.num_free_blocks()
        return AllocatorStats(
            num_blocks=self.num_blocks,
            used=self.num_blocks - free,
            cached=len(self._lru),
            empty=len(self._empty),
            clean=self._clean_cached,
            requests=len(self._requests),
            hit_blocks=self._hit_blocks,
            restored_blocks=self._restored_blocks,
            evicted_blocks=self._evicted_blocks,
            dropped_blocks=self._dropped_blocks,
            pressure_events=self._pressure_events,
        )

    # -- pressure callbacks ---------------------------------------------------------

    def add_pressure_callback(self, callback: Callable[[MemoryPressure], None]) -> None:
        """Run ``callback`` after every ``allocate`` / ``extend`` that takes blocks and
        leaves the pool under pressure. It runs after the call's changes; an exception it raises
        reaches the caller of that call (whose changes stand)."""
        self._callbacks.append(callback)

    def remove_pressure_callback(self, callback: Callable[[MemoryPressure], None]) -> None:
        self._callbacks.remove(callback)

    def _check_pressure(self) -> None:
        if not self.under_pressure():
            return
        self._pressure_events += 1
        event = MemoryPressure(
            len(self._empty), self._clean_cached, len(self._lru), self.watermark_blocks
        )
        for callback in list(self._callbacks):
            callback(event)

    # -- request lifecycle ----------------------------------------------------------

    def _get(self, request_id: RequestId, what: str) -> Request:
        req = self._requests.get(request_id)
        if req is None:
            raise PagedCacheError(
                f"{what}: unknown request {request_id!r} (never allocated, or already freed)"
            )
        return req

    def _idle(self, request_id: RequestId, what: str) -> Request:
        req = self._get(request_id, what)
        if req.pending is not None:
            raise PagedCacheError(
                f"{what}: request {request_id!r} has a restore in flight; "
                "call complete_restore first"
            )
        return req

    def _check_fits(self, request_id: RequestId, num_blocks: int, what: str) -> None:
        if num_blocks > self.num_blocks:
            raise PagedCacheError(
                f"{what}: request {request_id!r} needs {num_blocks} blocks, "
                f"the pool has {self.num_blocks} in all"
            )

    def _segments(
        self, tokens: Sequence[int], hashes: list[bytes], tail: bool
    ) -> list[tuple[bytes, int, int]]:
        """``(key, first block, stop block)`` of each offload block of a sequence."""
        k = self.blocks_per_offload
        whole = len(hashes) // k
        segs = [(hashes[c * k + k - 1], c * k, c * k + k) for c in range(whole)]
        stop = _cdiv(len(tokens), self.block_size)
        if tail and stop > whole * k:
            parent = hashes[whole * k - 1] if whole else self.root
            segs.append((hash_tail(parent, tokens[whole * k * self.block_size :]), whole * k, stop))
        return segs

    def _limits(self, num_tokens: int, compute_last: bool) -> tuple[int, int]:
        """Blocks that may be shared (resident) and restored at most."""
        if compute_last:
            limit = (num_tokens - 1) // self.block_size
            return limit, limit
        return num_tokens // self.block_size, _cdiv(num_tokens, self.block_size)

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
        tokens = list(token_ids)
        if len(tokens) == 1 and type(tokens[0]) is int and -(2**63) <= tokens[0] < 2**63:
            return tokens  # one decoded token: the common case, checked without packing
        try:
            pack_tokens(tokens)
        except PagedCacheError as exc:
            raise PagedCacheError(f"{what}: {exc}") from None
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
        has no tokens, a token id is not an int64 or it needs more blocks than the
        pool has; :class:`~kvactors.errors.OutOfBlocksError` if not enough blocks
        are free now. On any error nothing changed.
        """
        if request_id in self._requests:
            raise PagedCacheError(f"allocate: request {request_id!r} is already allocated")
        tokens = self._tokens(token_ids, "allocate")
        if not tokens:
            raise PagedCacheError(f"allocate: request {request_id!r} has no tokens")
        bs, k = self.block_size, self.blocks_per_offload
        total = _cdiv(len(tokens), bs)
        self._check_fits(request_id, total, "allocate")
        hashes = hash_blocks(self.root, tokens, bs)
        share_limit, restore_limit = self._limits(len(tokens), compute_last)
        r = self._resident_run(hashes, share_limit)
        restore: list[tuple[int, int]] = []  # (table index, row)
        restore_keys: list[bytes] = []
        if offloaded:
            segments = self._segments(tokens, hashes, tail=not compute_last)
            for key, first, stop in segments:
                if stop <= r:
                    continue
                if first >= restore_limit or key not in offloaded:
                    break
                rows = range(max(first, r), min(stop, restore_limit))
                if not rows:
                    break  # the blocks of this chunk in reach are all in the pool
                restore += [(i, len(restore_keys) * k + i - first) for i in rows]
                restore_keys.append(key)
                if stop > restore_limit:
                    break
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
        total = _cdiv(old_len + len(new), bs)
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
        if child_id in self._requests:
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

    # -- offloading -----------------------------------------------------------------

    def prepare_offload(self) -> list[OffloadItem]:
        """Under pressure: the least recently used cached blocks to store before reuse.

        Plans enough offload blocks to bring the reusable blocks back to the
        watermark (stores in flight count as done), as far as cached blocks
        allow. Each item's key stays in flight until :meth:`complete_offload`;
        the caller must copy the bytes out before
        its next call on the allocator. Returns ``[]`` when not under pressure.
        """
        if not self.offloading or not self.under_pressure():
            return []
        missing = self.watermark_blocks - len(self._empty) - self._clean_cached
        for key in self._in_flight:  # stores already under way count as done
            b = self._by_key.get(key)
            if b is not None and b in self._lru and not self._clean[b]:
                missing -= 1
        items: list[OffloadItem] = []
        planned: set[int] = set()
        for b in self._lru:
            if missing <= 0:
                break
            if self._clean[b] or b in planned:
                continue
            item = self._chunk_item(b)
            if item is None:
                continue
            items.append(item)
            self._in_flight.add(item.key)
            for a in item.block_ids:
                if a not in planned and a in self._lru and not self._clean[a]:
                    missing -= 1
                planned.add(a)
        return items

    def prepare_swap_out(self, request_id: RequestId) -> list[OffloadItem]:
        """The offload blocks that save ``request_id`` before it is freed (swapped out).

        Whole chunks already offloaded and keys already in flight are skipped;
        the tail (partial block included) is always named. The caller copies the
        bytes out, frees the request, stores the items and calls ``complete_offload``.
        """
        req = self._idle(request_id, "prepare_swap_out")
        items: list[OffloadItem] = []
        n_full = len(req.hashes)
        for key, first, stop in self._segments(req.tokens, req.hashes, tail=True):
            if key in self._in_flight or (stop <= n_full and self._clean[req.blocks[stop - 1]]):
                continue
            hashes: list[bytes | None] = [
                req.hashes[i] if i < n_full else None for i in range(first, stop)
            ]
            items.append(OffloadItem(key, req.blocks[first:stop], hashes))
            self._in_flight.add(key)
        return items

    def complete_offload(self, items: Sequence[OffloadItem], success: bool) -> None:
        """Finish a store of ``items``: on success their blocks still in the pool are clean."""
        for item in items:
            self._in_flight.discard(item.key)
            if not success:
                continue
            for key in item.hashes:
                b = self._by_key.get(key) if key is not None else None
                if b is not None and not self._clean[b]:
                    self._clean[b] = True
                    if b in self._lru:
                        self._clean_cached += 1

    def _chunk_item(self, b: int) -> OffloadItem | None:
        """The whole chunk ending at registered block ``b``, if all of it is in the pool."""
        k = self.blocks_per_offload
        key = self._key[b]
        if key is None or (self._depth[b] + 1) % k or key in self._in_flight:
            return None
        ids = [b]
        hashes: list[bytes | None] = [key]
        parent = self._parent[b]
        for _ in range(k - 1):
            a = self._by_key.get(parent)
            if a is None:
                return None
            ids.append(a)
            hashes.append(parent)
            parent = self._parent[a]
        ids.reverse()
        hashes.reverse()
        return OffloadItem(key, ids, hashes)

    # -- block bookkeeping ----------------------------------------------------------

    def _acquire(self, b: int) -> None:
        if self._ref[b] == 0:
            del self._lru[b]
            if self._clean[b]:
                self._clean_cached -= 1
        self._ref[b] += 1

    def _take(self, n: int) -> tuple[list[int], list[OffloadItem]]:
        """``n`` blocks at ref 1: empty ones first, then the least recently used cached."""
        taken = [heapq.heappop(self._empty) for _ in range(min(n, len(self._empty)))]
        victims: list[int] = []
        lru = iter(self._lru)
        while len(taken) + len(victims) < n:
            victims.append(next(lru))
        evicted: list[OffloadItem] = []
        if self.offloading:
            # Plan every victim's offload before any is unregistered: a chunk's
            # earlier blocks may be victims of this same call.
            for b in victims:
                if self._clean[b] or self._key[b] in self._in_flight:
                    continue
                item = self._chunk_item(b)
                if item is not None:
                    evicted.append(item)
                else:
                    self._dropped_blocks += 1
        elif victims:
            self._dropped_blocks += len(victims)
        for b in victims:
            del self._lru[b]
            if self._clean[b]:
                self._clean_cached -= 1
            self._unregister(b)
        self._evicted_blocks += len(victims)
        taken += victims
        for b in taken:
            self._ref[b] = 1
        return taken, evicted

    def _register(self, req: Request, i: int) -> None:
        """Register block ``i`` of ``req`` under its key, unless another block holds it."""
        key = req.hashes[i]
        if key in self._by_key:
            return  # another block holds the same tokens; this one stays private
        b = req.blocks[i]
        self._by_key[key] = b
        self._key[b] = key
        self._parent[b] = req.hashes[i - 1] if i else self.root
        self._depth[b] = i

    def _unregister(self, b: int) -> None:
        key = self._key[b]
        if key is not None:
            del self._by_key[key]
            self._key[b] = None
        self._clean[b] = False

    # -- defragmentation ------------------------------------------------------------

    def defragment(self) -> dict[int, int]:
        """Move every block holding data (referenced or cached) to the lowest ids.

        Rewrites every block table, the cache index and the LRU order; returns
        ``{old id: new id}`` for the blocks that moved. The caller moves their
        bytes (:meth:`KVTensors.copy_blocks` with the mapping's keys and values,
        which never overlap). A restore in flight stays valid: its targets are
        resolved by ``complete_restore``.
        """
        live = [b for b in range(self.num_blocks) if self._ref[b] or self._key[b] is not None]
        n_live = len(live)
        holes = sorted(b for b in self._empty if b < n_live)
        movers = [b for b in live if b >= n_live]
        mapping = dict(zip(movers, holes, strict=True))
        for old, new in mapping.items():
            self._ref[new], self._ref[old] = self._ref[old], 0
            self._key[new], self._key[old] = self._key[old], None
            self._parent[new], self._depth[new] = self._parent[old], self._depth[old]
            self._clean[new], self._clean[old] = self._clean[old], False
            key = self._key[new]
            if key is not None:
                self._by_key[key] = new
        if mapping:
            for req in self._requests.values():
                req.blocks = [mapping.get(b, b) for b in req.blocks]
            self._lru = OrderedDict((mapping.get(b, b), None) for b in self._lru)
        self._empty = list(range(n_live, self.num_blocks))
        return mapping
