"""The paged KV cache with offloading: the async side of the block allocator.

:class:`PagedKVCache` owns a :class:`~kvactors.paged.allocator.BlockAllocator`
(which decides), the :class:`~kvactors.paged.kv_tensors.KVTensors` (the bytes)
and an :class:`Offloader` (where bytes go when they leave the pool). Every plan
the allocator returns is executed here in the same order:

1. copy out the rows to store (``gather`` into a staging tensor) *before the
   first await*, so no later call can overwrite the blocks first;
2. apply copy-on-write copies;
3. await the offloader: load rows to restore, store the rows copied out;
4. complete the handshake on the allocator (``complete_offload`` /
   ``complete_restore``), whatever happened in step 3, cancellation included.

Rows travel in staging tensors on the CPU, never the pool itself, so a transfer
still in flight after its caller was cancelled writes into memory nobody reads.

The gathers of step 1 and the scatters after a load run on the event loop, on
purpose: done in one synchronous stretch with the allocator's decision, they
need no pins (no other task can evict, reuse or move those blocks meanwhile).
Their size is bounded by one plan (the blocks one call evicts, restores or
offloads); the transfers to and from the offloader are the offloader's, off
the loop.

The offloader is anything with the three coroutines of :class:`Offloader`; the
coordinator's ``KVCache`` (``async with kvactors.open(config) as kv``) is one,
with ``config.block_bytes`` equal to ``KVCacheConfig.offload_bytes``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol, runtime_checkable

import msgspec
import torch

from kvactors.config import Config
from kvactors.errors import ConfigError, KVActorsError, PagedCacheError
from kvactors.keys import Key
from kvactors.paged.allocator import (
    AllocatorStats,
    BlockAllocator,
    BlockTable,
    OffloadItem,
    RequestId,
)
from kvactors.paged.config import KVCacheConfig
from kvactors.paged.kv_tensors import KVTensors

__all__ = ["Allocation", "Offloader", "PagedKVCache", "PagedStats", "SupportsHits", "SwappedOut"]


class SupportsHits(Protocol):
    """A lookup result: ``hits`` leading keys are available."""

    @property
    def hits(self) -> int: ...


@runtime_checkable
class Offloader(Protocol):
    """Where blocks go when they leave the pool, one offload row per key.

    - ``lookup(keys)``: how many *leading* keys can be loaded now (an ``int``, or
      a result with a ``hits`` attribute).
    - ``store(keys, src)``: store row ``i`` of ``src`` (a ``(len(keys),
      offload_bytes)`` uint8 tensor) under ``keys[i]``; keys already stored are
      skipped. Returns ``None`` when it cannot store now (nothing stored);
      anything else means stored. Raises a ``KVActorsError`` if it failed.
      ``src`` is lent for the call only (its memory is reused afterwards): copy
      what is kept.
    - ``load(keys, dst)``: write the row of ``keys[i]`` into row ``i`` of ``dst``;
      raises a ``KVActorsError`` if a key is missing or the transfer failed.
    """

    async def lookup(self, keys: Sequence[Key]) -> int | SupportsHits: ...

    async def store(self, keys: Sequence[Key], src: torch.Tensor) -> object: ...

    async def load(self, keys: Sequence[Key], dst: torch.Tensor) -> object: ...


class Allocation(msgspec.Struct, frozen=True):
    """A request got its blocks: the engine computes tokens from ``num_cached_tokens`` on.

    ``num_loaded_tokens`` of the cached tokens were loaded back from the
    offloader (the others were shared with blocks in the pool).
    """

    block_table: BlockTable
    num_cached_tokens: int
    num_loaded_tokens: int


class SwappedOut(msgspec.Struct, frozen=True):
    """A request freed by ``swap_out``; pass it to ``swap_in`` to bring it back.

    ``stored_blocks`` offload blocks were stored (0 without an offloader or if
    the store failed: ``swap_in`` then recomputes what is missing).
    """

    request_id: RequestId
    token_ids: list[int]
    stored_blocks: int


class PagedStats(msgspec.Struct, frozen=True):
    """``stored_blocks`` / ``loaded_blocks`` count offload blocks moved;
    ``store_failures`` / ``load_failures`` count offloader calls that raised or
    (for stores) returned ``None``."""

    allocator: AllocatorStats
    stored_blocks: int
    loaded_blocks: int
    store_failures: int
    load_failures: int
    lookups: int


def _hits(result: int | SupportsHits, n: int) -> int:
    hits = result if isinstance(result, int) else result.hits
    return max(0, min(n, hits))


class PagedKVCache:
    """The engine-side paged KV cache: allocator + KV tensors + offloader.

    Queries (``get_block_table``, ``num_free_blocks``, ``usage``,
    ``can_allocate``, ``stats``, pressure callbacks) go to :attr:`allocator`.
    ``offloader=None`` runs without offloading: evicted blocks are dropped and
    ``swap_out`` frees (``swap_in`` recomputes). ``kv``: tensors the engine
    already owns (default: allocated from ``config``). ``staging_bytes``: host
    staging buffers kept for reuse between transfers.

    Methods may be called from several tasks of one event loop; each one's
    synchronous part runs without interruption, and a block's bytes are copied
    out before any await, so calls interleave safely without locks.
    """

    def __init__(
        self,
        config: KVCacheConfig,
        offloader: Offloader | None = None,
        *,
        kv: KVTensors | None = None,
        staging_bytes: int = 64 << 20,
    ) -> None:
        if not isinstance(config, KVCacheConfig):
            raise ConfigError(f"config: expected a KVCacheConfig, got {type(config).__name__}")
        if offloader is not None and not isinstance(offloader, Offloader):
            hint = (
                " (open it first: async with kvactors.open(config) as kv)"
                if isinstance(offloader, Config)
                else ""
            )
            raise ConfigError(
                "offloader: expected an Offloader (lookup, store and load coroutines, "
                f"such as the KVCache kvactors.open gives), got {type(offloader).__name__}{hint}"
            )
        # An offloader that says its block size (the coordinator's KVCache, by
        # its config) must take offload rows of exactly config.offload_bytes.
        block_bytes = getattr(getattr(offloader, "config", None), "block_bytes", None)
        if type(block_bytes) is int and block_bytes != config.offload_bytes:
            raise ConfigError(
                f"block_bytes: the offloader's blocks are {block_bytes} bytes, "
                f"config.offload_bytes is {config.offload_bytes}"
            )
        self.config = config
        self.offloader = offloader
        self.kv = kv if kv is not None else KVTensors(config)
        self.allocator = BlockAllocator.from_config(config, offloading=offloader is not None)
        self._pin = self.kv.device.type == "cuda"
        self._staging_bytes = staging_bytes
        self._spares: list[torch.Tensor] = []
        self._stored = 0
        self._loaded = 0
        self._store_failures = 0
        self._load_failures = 0
        self._lookups = 0

    def stats(self) -> PagedStats:
        return PagedStats(
            self.allocator.stats(),
            self._stored,
            self._loaded,
            self._store_failures,
            self._load_failures,
            self._lookups,
        )

    # -- requests -------------------------------------------------------------------

    async def allocate(self, request_id: RequestId, token_ids: Sequence[int]) -> Allocation:
        """Give a new request its blocks, sharing cached blocks and loading offloaded ones.

        The last token is always left to compute (the engine needs its logits).
        A failed load is not an error: those tokens are left to compute. Raises
        what :meth:`BlockAllocator.allocate` raises (nothing changed then). If
        cancelled, the request is not allocated: its blocks are released.
        """
        return await self._admit(request_id, token_ids, compute_last=True)

    async def swap_in(self, swapped: SwappedOut) -> Allocation:
        """Bring back a request freed by :meth:`swap_out`, loading every block it can.

        ``num_cached_tokens`` may be less than its token count (blocks the
        offloader no longer had): the engine recomputes those. Errors and
        cancellation as for :meth:`allocate`, and
        :class:`~kvactors.errors.PagedCacheError` for a ``swapped`` that is not a
        :class:`SwappedOut`.
        """
        if not isinstance(swapped, SwappedOut):
            raise PagedCacheError(
                f"swap_in: expected the SwappedOut that swap_out returned, "
                f"got {type(swapped).__name__}"
            )
        return await self._admit(swapped.request_id, swapped.token_ids, compute_last=False)

    async def _admit(
        self, request_id: RequestId, token_ids: Sequence[int], *, compute_last: bool
    ) -> Allocation:
        core = self.allocator
        # Checked before the lookup: a call that raises looks nothing up.
        tokens = core._new_request(request_id, token_ids)
        offloaded: Collection[bytes] = ()
        if self.offloader is not None:
            match = core.match(tokens, compute_last=compute_last)
            if match.lookup_keys:
                self._lookups += 1
                result = await self.offloader.lookup(match.lookup_keys)
                offloaded = set(match.lookup_keys[: _hits(result, len(match.lookup_keys))])
        plan = core.allocate(request_id, tokens, offloaded=offloaded, compute_last=compute_last)
        evicted = self._snapshot(plan.evicted)
        restoring = bool(plan.restore_keys)
        cached = plan.num_cached_tokens
        try:
            # Load before storing what was evicted: the loaded blocks are the hot
            # ones, and stores may push older blocks down the offloader's tiers.
            if restoring:
                restoring = False
                if not await self._restore(request_id, plan.restore_keys):
                    cached = plan.num_shared_tokens
            await self._store(plan.evicted, *evicted)
            await self.relieve_pressure()
        except BaseException:
            # Cancelled (or a bug): undo the allocation; its new blocks were never written.
            if restoring:
                core.complete_restore(request_id, False)
            core.free(request_id, computed=False)
            raise
        return Allocation(plan.block_table, cached, cached - plan.num_shared_tokens)

    async def _restore(self, request_id: RequestId, keys: list[bytes]) -> bool:
        """Load ``keys`` and scatter them into the request's restore targets."""
        assert self.offloader is not None
        buffer, staging = self._staging(len(keys))
        ok = False
        try:
            await self.offloader.load(keys, staging)
            ok = True
        except KVActorsError:
            self._load_failures += 1
        finally:
            # Runs on cancellation too; no await, so it cannot be interrupted.
            targets = self.allocator.complete_restore(request_id, ok)
        # Not reached if cancelled: a load still in flight may write the buffer.
        self._recycle(buffer)
        if ok:
            flat = staging.view(-1, self.config.block_size_bytes)
            n = len(targets.rows)
            if targets.rows == list(range(n)):
                rows = flat[:n]  # every row, in order: no gather needed
            else:
                rows = flat[torch.tensor(targets.rows, dtype=torch.long)]
            self.kv.scatter(targets.block_ids, rows)
            self._loaded += len(keys)
        return ok

    async def extend(self, request_id: RequestId, token_ids: Sequence[int]) -> BlockTable:
        """Append ``token_ids`` to a request (copy-on-write of a shared partial block).

        Raises what :meth:`BlockAllocator.extend` raises (nothing changed then).
        The extension is done before the first await: if cancelled, it stands,
        and only the offloading of blocks it evicted may be lost.
        """
        plan = self.allocator.extend(request_id, token_ids)
        evicted = self._snapshot(plan.evicted)
        if plan.copies:
            self.kv.copy_blocks([s for s, _ in plan.copies], [d for _, d in plan.copies])
        await self._store(plan.evicted, *evicted)
        await self.relieve_pressure()
        return self.allocator.get_block_table(request_id)

    def fork(self, parent_id: RequestId, child_id: RequestId) -> BlockTable:
        """A new request sharing every block of ``parent_id`` (see :meth:`BlockAllocator.fork`)."""
        return self.allocator.fork(parent_id, child_id)

    def free(self, request_id: RequestId, *, computed: bool = True) -> list[int]:
        """Release a request's blocks (see :meth:`BlockAllocator.free`); its token ids.

        ``computed=False``: the request was aborted before the engine wrote its
        tokens, so the blocks it filled are dropped, not cached.
        """
        return self.allocator.free(request_id, computed=computed)

    async def swap_out(self, request_id: RequestId) -> SwappedOut:
        """Store a request's blocks in the offloader and free it (preemption).

        Blocks already offloaded are not stored again. The request is freed
        before the first await: if cancelled, it stays freed and what was not
        stored is recomputed by :meth:`swap_in`. Raises PagedCacheError naming
        ``swap_out`` for an unknown request.
        """
        core = self.allocator
        core._idle(request_id, "swap_out")
        if self.offloader is None:
            return SwappedOut(request_id, core.free(request_id), 0)
        items = core.prepare_swap_out(request_id)
        staged = self._snapshot(items)
        tokens = core.free(request_id)
        return SwappedOut(request_id, tokens, await self._store(items, *staged))

    def defragment(self) -> dict[int, int]:
        """Compact every block holding data toward low ids, moving its bytes.

        Returns ``{old id: new id}`` of the moved blocks; every block table
        follows. Safe while stores or loads are in flight (they use staging rows).
        """
        mapping = self.allocator.defragment()
        if mapping:
            self.kv.copy_blocks(list(mapping), list(mapping.values()))
        return mapping

    # -- memory pressure ------------------------------------------------------------

    async def relieve_pressure(self) -> int:
        """Under memory pressure, store the least recently used cached blocks.

        Runs after every ``allocate``, ``swap_in`` and ``extend``; an engine may
        also call it between steps. The blocks stay cached (and shareable) and
        become *clean*: reusing them later needs no store. Returns the number of
        offload blocks stored. If cancelled, the blocks stay not clean.
        """
        items = self.allocator.prepare_offload()
        if not items:
            return 0
        return await self._store(items, *self._snapshot(items))

    # -- moving rows ----------------------------------------------------------------

    def _staging(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A staging buffer (a spare one when big enough) and a view of its first ``n`` rows."""
        size = n * self.config.offload_bytes
        for i, spare in enumerate(self._spares):
            if spare.numel() >= size:
                buffer = self._spares.pop(i)
                break
        else:
            buffer = torch.empty(size, dtype=torch.uint8, pin_memory=self._pin)
        return buffer, buffer[:size].view(n, self.config.offload_bytes)

    def _recycle(self, buffer: torch.Tensor) -> None:
        """Keep ``buffer`` for reuse, once no transfer can read or write it any more.

        Fresh buffers cost a page fault per page on first touch (or a pinned
        allocation); spares up to ``staging_bytes`` in all are kept, largest first.
        """
        spares = sorted([*self._spares, buffer], key=len, reverse=True)
        kept = 0
        self._spares = []
        for spare in spares:
            if kept + spare.numel() <= self._staging_bytes:
                self._spares.append(spare)
                kept += spare.numel()

    def _snapshot(self, items: Sequence[OffloadItem]) -> tuple[torch.Tensor, torch.Tensor]:
        """The offload rows of ``items``, copied out of the pool now (no await);
        returns the staging buffer and the rows."""
        k = self.config.blocks_per_offload
        whole = all(len(item.block_ids) == k for item in items)
        buffer, rows = self._staging(len(items))
        if not items:
            return buffer, rows
        if not whole:
            rows.zero_()
        flat = rows.view(-1, self.config.block_size_bytes)
        ids = [b for item in items for b in item.block_ids]
        if whole:
            self.kv.gather(ids, out=flat)
        else:
            # A tail holds fewer than k blocks; the rest of its row stays zero.
            where = [i * k + j for i, item in enumerate(items) for j in range(len(item.block_ids))]
            flat[torch.tensor(where, dtype=torch.long)] = self.kv.gather(ids).to(flat.device)
        return buffer, rows

    async def _store(
        self, items: Sequence[OffloadItem], buffer: torch.Tensor, rows: torch.Tensor
    ) -> int:
        """Store ``rows`` under the items' keys; the number of offload blocks stored."""
        if not items:
            self._recycle(buffer)
            return 0
        assert self.offloader is not None  # items are planned only when there is one
        ok = False
        try:
            result = await self.offloader.store([item.key for item in items], rows)
            ok = result is not None
        except KVActorsError:
            pass
        finally:
            # Runs on cancellation too; no await, so it cannot be interrupted.
            self.allocator.complete_offload(items, ok)
        self._recycle(buffer)  # not reached if cancelled: the store may still read it
        if not ok:
            self._store_failures += 1
            return 0
        self._stored += len(items)
        return len(items)
