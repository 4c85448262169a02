"""Building managers for the manager tests, on either core.

``"lru-python"`` is the ``lru`` policy on the Python manager; ``"lru"`` runs on
the compiled core where it is built (the Python manager otherwise); the same
for every built-in policy. So every scenario and the state machine check both
cores against the same expectations.
"""

from __future__ import annotations

from typing import Any

from kvactors import OffloadingManager
from kvactors.policy import CachePolicy

POLICY_NAMES = ["lru", "arc", "weighted_lru", "prefix_admit"]
MANAGER_POLICIES = [f"{name}{core}" for name in POLICY_NAMES for core in ("", "-python")]
LRU_CORES = ["lru", "lru-python"]
ADMITTING = frozenset({"prefix_admit"})
"""Policies that may store fewer new keys than a ``prepare_store`` names."""


def make_manager(
    num_blocks: int, policy: str | CachePolicy = "lru", **kwargs: Any
) -> OffloadingManager:
    if isinstance(policy, str) and policy.endswith("-python"):
        name = policy.removesuffix("-python")
        return OffloadingManager(num_blocks, block_size=16, policy=name, native=False, **kwargs)
    return OffloadingManager(num_blocks, block_size=16, policy=policy, **kwargs)
