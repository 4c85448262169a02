"""Placeholder replaced by the weighted LRU implementation (see issue: foundation)."""

from __future__ import annotations

from kvactors.policy.lru import LRUPolicy


class WeightedLRUPolicy(LRUPolicy):
    name = "weighted_lru"
