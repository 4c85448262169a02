"""Building managers for the manager tests, on either core.

``"lru-python"`` is the ``lru`` policy on the Python manager; ``"lru"`` runs on
the compiled core where it is built (the Python manager otherwise), so every
scenario and the state machine check both against the same expectations.
"""

from __future__ import annotations

from typing import Any

from kvactors import OffloadingManager

MANAGER_POLICIES = ["lru", "lru-python", "arc", "weighted_lru"]
LRU_CORES = ["lru", "lru-python"]


def make_manager(num_blocks: int, policy: str = "lru", **kwargs: Any) -> OffloadingManager:
    if policy == "lru-python":
        return OffloadingManager(num_blocks, block_size=16, policy="lru", native=False, **kwargs)
    return OffloadingManager(num_blocks, block_size=16, policy=policy, **kwargs)
