"""kvactors: tiered KV-cache offloading for LLM serving.

Layers, top to bottom (no import goes upward)::

    cli/            kvactors demo | replay | bench
    paged/          engine-side paged KV cache (block tables, allocator)
    coordinator     the front door: lookup / load / store / prefetch, events, stats
    policy actor    which block is in which tier, one OffloadingManager per tier
    tier actors     Write / Read / Copy / Drop jobs on one medium's slots
    media/          bytes only: GPU pool, CPU pool, NVMe store
    actors/         mailbox, envelope + one-shot reply, ask / tell
    manager         one tier's metadata: slots, ref counts, events (vLLM API)
    policy/         eviction order only: lru, arc, weighted_lru

``OffloadingManager`` is the synchronous core a scheduler may embed directly.
"""

from __future__ import annotations

from kvactors import errors
from kvactors.actors import Future
from kvactors.config import Config, GPUConfig, NVMeConfig, TierConfig
from kvactors.coordinator import CacheStats, KVCache, LoadResult, StoreResult, open
from kvactors.events import CacheEvent
from kvactors.manager import (
    LoadStoreSpec,
    ManagerStats,
    OffloadingEvent,
    OffloadingManager,
    PrepareStoreOutput,
)
from kvactors.policy import POLICIES, CachePolicy, make_policy

__all__ = [
    "POLICIES",
    "CacheEvent",
    "CachePolicy",
    "CacheStats",
    "Config",
    "Future",
    "GPUConfig",
    "KVCache",
    "LoadResult",
    "LoadStoreSpec",
    "ManagerStats",
    "NVMeConfig",
    "OffloadingEvent",
    "OffloadingManager",
    "PrepareStoreOutput",
    "StoreResult",
    "TierConfig",
    "errors",
    "make_policy",
    "open",
]

__version__ = "0.1.0"
