"""The paged pool's blocks: the state of each, and the bookkeeping every call shares.

Every block of the pool is in exactly one state:

- *empty*: holds nothing; handed out first, lowest id first;
- *referenced*: in the block table of ``ref_count(b) > 0`` requests;
- *cached*: idle (no request holds it) but it holds a full block whose key is
  known, so a later request with the same prefix shares it without recompute.
  Cached blocks are reused least recently used first when no empty block is left.

A cached block is *clean* when its bytes are known to be in the offload store.
Fewer than ``watermark_blocks`` blocks empty or cached and clean is *pressure*.
:class:`BlockPool` holds these states, the cache index (key -> block), the LRU
order and the counters; :class:`~kvactors.paged.offload_planner.OffloadPlanner`
plans offloads and restores over it, and
:class:`~kvactors.paged.allocator.BlockAllocator` runs the requests.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from kvactors.errors import PagedCacheError
from kvactors.paged.plans import AllocatorStats, MemoryPressure, Request, RequestId

__all__ = ["BlockPool", "cdiv"]


def cdiv(a: int, b: int) -> int:
    """``a / b`` rounded up."""
    return -(-a // b)


class BlockPool:
    """The blocks of a pool of ``num_blocks`` blocks of ``block_size`` tokens and
    their states (the arguments: see :class:`~kvactors.paged.allocator.BlockAllocator`)."""

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
        if not isinstance(root, bytes):
            raise PagedCacheError(f"root: expected bytes (a root key), got {type(root).__name__}")
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
        return cdiv(num_tokens, self.block_size) <= self.num_free_blocks()

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

    # -- requests -------------------------------------------------------------------

    def _known(self, request_id: RequestId, what: str) -> bool:
        """Whether ``request_id`` is allocated; PagedCacheError for an id that is
        not hashable (a list, a dict: no request can have it)."""
        try:
            return request_id in self._requests
        except TypeError:
            raise PagedCacheError(
                f"{what}: a request id must be hashable (a str or an int), "
                f"got {type(request_id).__name__}"
            ) from None

    @staticmethod
    def _success(success: object, what: str) -> bool:
        """``success`` as a bool: a ``bool``, or a numpy or torch bool scalar;
        PagedCacheError for anything else (a list, ``None``, an int), which would
        otherwise count by its truth."""
        if type(success) is bool:
            return success
        if "bool" in str(getattr(success, "dtype", "")) and getattr(success, "ndim", 1) == 0:
            return bool(success)
        raise PagedCacheError(f"{what}: success must be a bool, got {success!r}")

    def _get(self, request_id: RequestId, what: str) -> Request:
        req = self._requests.get(request_id) if self._known(request_id, what) else None
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

    # -- pressure callbacks ---------------------------------------------------------

    def add_pressure_callback(self, callback: Callable[[MemoryPressure], None]) -> None:
        """Run ``callback`` after every ``allocate`` / ``extend`` that takes blocks and
        leaves the pool under pressure. It runs after the call's changes; an exception it raises
        reaches the caller of that call (whose changes stand), and the callbacks
        after it do not run for that event. PagedCacheError for a ``callback``
        that is not callable (it would have failed the first call under pressure)."""
        if not callable(callback):
            raise PagedCacheError(
                f"add_pressure_callback: expected a callable, got {type(callback).__name__}"
            )
        self._callbacks.append(callback)

    def remove_pressure_callback(self, callback: Callable[[MemoryPressure], None]) -> None:
        """Stop running ``callback``; PagedCacheError if it was never added."""
        try:
            self._callbacks.remove(callback)
        except ValueError:
            raise PagedCacheError(
                f"remove_pressure_callback: {callback!r} is not a pressure callback"
            ) from None

    def _check_pressure(self) -> None:
        if not self.under_pressure():
            return
        self._pressure_events += 1
        event = MemoryPressure(
            len(self._empty), self._clean_cached, len(self._lru), self.watermark_blocks
        )
        for callback in list(self._callbacks):
            callback(event)

    # -- block bookkeeping ----------------------------------------------------------

    def _acquire(self, b: int) -> None:
        if self._ref[b] == 0:
            del self._lru[b]
            if self._clean[b]:
                self._clean_cached -= 1
        self._ref[b] += 1

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
