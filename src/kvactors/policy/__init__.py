"""Eviction policies: pure, synchronous orderings of one tier's blocks.

- ``lru``: one recency list. The default; cheapest, good on chat traces.
- ``arc``: recency (T1) and frequency (T2) lists that trade space; adapts when
  scans mix with reuse.
- ``weighted_lru``: recency aged by frequency and block size; for workloads
  where a few shared prefixes are reused far more than the rest.
- ``prefix_admit``: decides admission as well as eviction: declines the new
  blocks of a chain position that is rarely reused, and keeps each class of
  block (by chain position, reuse count) in proportion to its measured value.

Each policy implements :class:`CachePolicy`; ``make_policy(name, capacity)``
builds one by name.
"""

from __future__ import annotations

from collections.abc import Callable

from kvactors.errors import UnknownPolicyError
from kvactors.keys import Key
from kvactors.policy._base import BlockStatus, CachePolicy
from kvactors.policy.arc import ARCPolicy
from kvactors.policy.lru import LRUPolicy
from kvactors.policy.prefix_admit import PrefixAdmitPolicy
from kvactors.policy.weighted_lru import WeightedLRUPolicy

__all__ = [
    "POLICIES",
    "ARCPolicy",
    "BlockStatus",
    "CachePolicy",
    "Key",
    "LRUPolicy",
    "PrefixAdmitPolicy",
    "WeightedLRUPolicy",
    "make_policy",
]

POLICIES: dict[str, Callable[[int], CachePolicy]] = {
    "lru": LRUPolicy,
    "arc": ARCPolicy,
    "weighted_lru": WeightedLRUPolicy,
    "prefix_admit": PrefixAdmitPolicy,
}


def make_policy(name: str, capacity: int) -> CachePolicy:
    """Build the policy called ``name`` for a tier of ``capacity`` blocks.

    Raises :class:`~kvactors.errors.UnknownPolicyError` listing the known names.
    """
    try:
        factory = POLICIES[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(POLICIES))
        raise UnknownPolicyError(f"unknown policy {name!r}; supported: {known}") from None
    return factory(capacity)
