"""The engine-side paged KV cache: the blocks a model attends over.

Modules, by role::

    config      KVCacheConfig: the KV layout; kv_size_per_token, block_size_bytes
    hashing     chained block keys (blake2b over parent key + int64 token ids)
    kv_tensors  KVTensors: per-layer [2, num_blocks, block_size, heads, head_dim];
                gather / scatter offload rows, copy_blocks
    block_pool  BlockPool: each block's state (empty, referenced, cached, clean),
                the cache index, LRU order, pressure, defragment
    offload_planner
                OffloadPlanner: over the pool, *plans* offloads (evicted blocks,
                prepare_offload, prepare_swap_out) and restores
    allocator   BlockAllocator: the synchronous core over both (block tables,
                prefix sharing, copy-on-write): allocate, extend, fork, free
    offload     Offloader protocol and PagedKVCache: executes those plans through
                an offloader (memory pressure, swap_out / swap_in)

An engine that schedules synchronously may embed ``BlockAllocator`` alone; an
async engine uses ``PagedKVCache`` with the coordinator as its offloader.
"""

from __future__ import annotations

from kvactors.paged.allocator import (
    AllocationPlan,
    AllocatorStats,
    BlockAllocator,
    BlockTable,
    ExtendPlan,
    MemoryPressure,
    OffloadItem,
    PrefixMatch,
    RequestId,
    RestoreTargets,
)
from kvactors.paged.config import DTYPES, KVCacheConfig
from kvactors.paged.hashing import hash_block, hash_blocks, hash_tail, root_key
from kvactors.paged.kv_tensors import KVTensors
from kvactors.paged.offload import (
    Allocation,
    Offloader,
    PagedKVCache,
    PagedStats,
    SupportsHits,
    SwappedOut,
)

__all__ = [
    "DTYPES",
    "Allocation",
    "AllocationPlan",
    "AllocatorStats",
    "BlockAllocator",
    "BlockTable",
    "ExtendPlan",
    "KVCacheConfig",
    "KVTensors",
    "MemoryPressure",
    "OffloadItem",
    "Offloader",
    "PagedKVCache",
    "PagedStats",
    "PrefixMatch",
    "RequestId",
    "RestoreTargets",
    "SupportsHits",
    "SwappedOut",
    "hash_block",
    "hash_blocks",
    "hash_tail",
    "root_key",
]
