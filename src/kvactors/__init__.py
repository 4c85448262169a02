"""kvactors: tiered KV-cache offloading for LLM serving.

Folders are the layers, top to bottom (no import goes upward)::

    cli/            kvactors demo | replay | bench ... (cli/bench/: one module a benchmark)
    vllm/           the vLLM offloading backend (spec, tiers, mover, a test engine)
    paged/          engine-side paged KV cache (block tables, allocator)
    cache/          the served cache: handle (KVCache, open: the front door) and its
                    argument checks, coordinator (prepare -> transfers -> complete)
                    over the executor (one plan's transfers, then its completion),
                    policy actor (its messages, accesses, shared tiers, events) over
                    placement (which block is in which tier of the chain; the plans),
                    tier actors (transfers on one medium), messages, transfers (the
                    one copy function), results, events, metrics
    actors/         mailbox, typed messages, one-shot reply; ask / tell / try_tell
    manager/        one tier's metadata: slots, ref counts, events (vLLM API)
    media/          bytes only: the BlockMedium protocol, memory pools (GPU pool, CPU
                    tier), the NVMe file store and its index, kvikio I/O, injected
                    faults, the remote (Valkey / Redis) store
    policy/         eviction order only: lru, arc, weighted_lru, prefix_admit
    config.py, errors.py, keys.py, traces.py   shared by every layer
    __main__.py     python -m kvactors: the kvactors command

``OffloadingManager`` is the synchronous core a scheduler may embed directly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvactors import errors
from kvactors.manager import (
    LoadStoreSpec,
    ManagerStats,
    OffloadingEvent,
    OffloadingManager,
    PrepareStoreOutput,
)
from kvactors.policy import POLICIES, CachePolicy, make_policy

if TYPE_CHECKING:
    from kvactors.actors import Future
    from kvactors.cache.events import CacheEvent
    from kvactors.cache.handle import KVCache, open
    from kvactors.cache.results import CacheStats, LoadResult, LookupResult, StoreResult
    from kvactors.config import Config, GPUConfig, NVMeConfig, TierConfig

# The async stack imports torch (seconds); the synchronous core and the CLI's
# replay do not need it, so these names load on first use (PEP 562).
_LAZY = {
    "Future": "kvactors.actors",
    "Config": "kvactors.config",
    "GPUConfig": "kvactors.config",
    "NVMeConfig": "kvactors.config",
    "TierConfig": "kvactors.config",
    "CacheStats": "kvactors.cache.results",
    "KVCache": "kvactors.cache.handle",
    "LoadResult": "kvactors.cache.results",
    "LookupResult": "kvactors.cache.results",
    "StoreResult": "kvactors.cache.results",
    "open": "kvactors.cache.handle",
    "CacheEvent": "kvactors.cache.events",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvactors' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


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
    "LookupResult",
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
