"""What the served cache's calls return: results, per-tier and per-transfer stats."""

from __future__ import annotations

import msgspec

from kvactors.actors import ActorStats
from kvactors.keys import Key
from kvactors.manager import ManagerStats
from kvactors.media.remote import RemoteCounters

__all__ = [
    "CacheStats",
    "FlushResult",
    "LatencyStats",
    "LoadResult",
    "LookupResult",
    "OpStats",
    "Snapshot",
    "StoreResult",
    "TierStats",
]


class StoreResult(msgspec.Struct, frozen=True):
    """``stored`` blocks were written by this call; ``present`` were already cached.

    ``durable`` lists the call's keys that a durable tier (an NVMe tier with a
    ``directory``) holds once the call returns: written there by this call
    (``write_through``) or already there. Only those survive a crash of the
    process; a block missing from it is in memory only, for now.
    """

    stored: int
    present: int
    durable: list[Key] = []


class LoadResult(msgspec.Struct, frozen=True):
    """``len(tiers)`` leading blocks were loaded (all of them unless ``partial``);
    ``tiers[i]`` is where block ``i`` came from."""

    tiers: list[str]


class LookupResult(msgspec.Struct, frozen=True):
    """``hits`` leading keys are available; ``tiers[i]`` says where key ``i`` is."""

    hits: int
    tiers: list[str]


class Snapshot(msgspec.Struct, frozen=True):
    """The managers' stats, the failed tiers and placement counters.

    ``demotions_lost`` counts victims dropped because there is no tier below,
    the tier below had no idle room, or the write there failed;
    ``demotions_declined`` counts victims the tier below's admission policy
    declined (they leave the cache too).
    """

    tiers: dict[str, ManagerStats]
    failed: list[str]
    promoted: int
    demoted: int
    demotions_lost: int
    corrupted: int
    events_published: int
    events_dropped: int
    missing: int = 0  # blocks a shared tier no longer had when read (evicted there)
    demotions_declined: int = 0
    # Per tier: keys ``lookup`` (and the lookup of a partial load) found there,
    # and keys it looked for there and did not find (in each live tier above the
    # one holding a key, and in every live tier for the first key none held).
    lookup_found: dict[str, int] = msgspec.field(default_factory=dict)
    lookup_missed: dict[str, int] = msgspec.field(default_factory=dict)


class FlushResult(msgspec.Struct, frozen=True):
    """What closing the cache wrote into a tier written ``on_demotion`` (the
    blocks still held above it): ``written``, ``failed`` (the tier refused or
    failed them, or they were in the batch being written when time ran out),
    ``left`` (not tried: time ran out), ``seconds`` taken and the
    first ``error`` (``None`` when every block was written)."""

    tier: str
    written: int
    failed: int
    left: int
    seconds: float
    error: str | None = None


class OpStats(msgspec.Struct, frozen=True):
    """Totals of the transfers between one (source, destination) pair."""

    jobs: int
    bytes: int
    seconds: float


class TierStats(msgspec.Struct, frozen=True):
    """The transfers a tier actor ran (it runs those whose I/O its medium does),
    keyed ``"source->destination"`` (``"gpu->cpu"``, ``"nvme->gpu"``,
    ``"tensor->cpu"`` for a caller's tensor, ...)."""

    name: str
    jobs: int
    failed_jobs: int
    bytes_read: int
    bytes_written: int
    busy_seconds: float
    transfers: dict[str, OpStats]
    crashed: str | None


class LatencyStats(msgspec.Struct, frozen=True):
    count: int
    p50_us: float
    p99_us: float


class CacheStats(msgspec.Struct, frozen=True):
    policy: Snapshot
    tiers: dict[str, TierStats]
    actors: list[ActorStats]
    latency: dict[str, LatencyStats]
    failed_stores: int
    failed_loads: int
    prefetch_dropped: int
    remote: RemoteCounters | None = None
    """The remote store's own counters (hits, misses, damaged values, bytes, nodes
    down); ``None`` without a remote tier."""


class Latency:
    """A bounded reservoir of latencies in microseconds."""

    def __init__(self, size: int = 8192) -> None:
        self.samples: list[float] = []
        self.size = size
        self.count = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        if len(self.samples) < self.size:
            self.samples.append(seconds * 1e6)
        else:
            self.samples[self.count % self.size] = seconds * 1e6

    def snapshot(self) -> LatencyStats:
        if not self.samples:
            return LatencyStats(0, 0.0, 0.0)
        s = sorted(self.samples)
        return LatencyStats(self.count, s[len(s) // 2], s[min(len(s) - 1, int(len(s) * 0.99))])
