"""Offload and restore planning of the paged pool: what to store, what to load.

Offloading is decided here and executed elsewhere (the async
:class:`~kvactors.paged.offload.PagedKVCache`), in the house's prepare/complete
style; nothing here does I/O:

- ``allocate`` and ``extend`` return the cached blocks they evicted that were
  not yet offloaded (``evicted``, planned by :meth:`OffloadPlanner._take`):
  their bytes are intact until the caller writes the blocks it got, so it
  copies them out first, then stores them.
- ``prepare_offload`` (memory pressure) and ``prepare_swap_out`` return blocks to
  store; ``complete_offload`` marks them offloaded (*clean*): a clean cached block
  is reused without a store.
- ``match`` names the keys to look up in the offload store; ``allocate`` given
  the keys found (``offloaded``) plans a restore (:meth:`OffloadPlanner._plan_restore`),
  and ``complete_restore`` says where the loaded rows go.

With ``blocks_per_offload = k > 1`` one offload block packs the ``k`` blocks
``[c*k, c*k + k)`` of a sequence (a *chunk*), keyed by its last block's key. A
sequence's *tail* (its blocks after the last whole chunk, the partial block
included) is stored by ``prepare_swap_out`` under a tail key.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Sequence

from kvactors.errors import PagedCacheError
from kvactors.paged.block_pool import BlockPool, cdiv
from kvactors.paged.hashing import hash_tail
from kvactors.paged.plans import OffloadItem, RequestId

__all__ = ["OffloadPlanner"]


class OffloadPlanner(BlockPool):
    """:class:`~kvactors.paged.block_pool.BlockPool` with the offload and restore
    plans (see the module docstring): which blocks to store or load, and the
    blocks an allocation takes (evicting cached ones, planning their stores)."""

    def _segments(
        self, tokens: Sequence[int], hashes: list[bytes], tail: bool
    ) -> list[tuple[bytes, int, int]]:
        """``(key, first block, stop block)`` of each offload block of a sequence."""
        k = self.blocks_per_offload
        whole = len(hashes) // k
        segs = [(hashes[c * k + k - 1], c * k, c * k + k) for c in range(whole)]
        stop = cdiv(len(tokens), self.block_size)
        if tail and stop > whole * k:
            parent = hashes[whole * k - 1] if whole else self.root
            segs.append((hash_tail(parent, tokens[whole * k * self.block_size :]), whole * k, stop))
        return segs

    def _plan_restore(
        self,
        tokens: Sequence[int],
        hashes: list[bytes],
        r: int,
        restore_limit: int,
        offloaded: Collection[bytes],
        compute_last: bool,
    ) -> tuple[list[tuple[int, int]], list[bytes]]:
        """The restore of a new request whose first ``r`` blocks are resident:
        ``(table index, row)`` of each block to load, and the offload keys to load
        (the offload blocks after the resident prefix found in ``offloaded``, up
        to ``restore_limit`` blocks, in order, stopping at the first one missing)."""
        k = self.blocks_per_offload
        restore: list[tuple[int, int]] = []
        restore_keys: list[bytes] = []
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
        return restore, restore_keys

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
        """Finish a store of ``items``: on success their blocks still in the pool are clean.

        PagedCacheError (nothing changed) for ``items`` that are not a sequence
        of :class:`OffloadItem` or a ``success`` that is not a bool.
        """
        success = self._success(success, "complete_offload")
        if not isinstance(items, Sequence) or not all(isinstance(i, OffloadItem) for i in items):
            raise PagedCacheError(
                "complete_offload: items must be the OffloadItems a plan gave, "
                f"got {type(items).__name__}"
            )
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
