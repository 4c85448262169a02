"""The policy actor: the one source of truth of which block is in which tier.

It owns one synchronous :class:`~kvactors.manager.OffloadingManager` per tier
of the chain (through :class:`~kvactors.cache.placement.Placement`), so every
handshake keeps the manager's semantics exactly. It never moves bytes: a
``Prepare*`` returns a plan, an ordered list of transfers the coordinator runs
through the tier actors, and the matching
:class:`~kvactors.cache.messages.Complete` (sent even when the caller was
cancelled) settles the managers. Every handler is synchronous, so each request
is atomic with respect to every other.

Where blocks go (stores, demotions, promotions, write-through, blocks in
flight) is :class:`~kvactors.cache.placement.Placement`'s, which this actor
extends with the messages, the accesses, the shared tiers and the events:

- a shared tier (a remote store other engines write too) is asked, through
  the coordinator, about keys no tier holds (``Discover``); those it has are
  recorded as held there (``Adopt``), so plans promote them like any block;
  before a load or prefetch they are recorded unasked (``Discover(adopt=True)``)
  and the read itself finds out which the server has;
- a tier written only on demotion (``write_policy = "on_demotion"``) gets the
  blocks still held above it written back as the cache closes (``PrepareFlush``).

What counts as an access (recency / frequency for the eviction policy): every
key a ``lookup`` or a ``load`` names, once per call, the first key most recent:
a block found in the tier it is found in (a load's pins), a key held nowhere in
the top tier, where a policy that remembers evicted keys (ARC's ghost lists)
learns it was wanted again. A store is not an access (a key already cached is
skipped untouched), so a request's ``load(partial=True)`` then ``store`` feeds
the policy what one manager's ``lookup``, ``touch``, ``prepare_store`` does.
A lookup then a load of a key is one access: a load does not count again the
keys a lookup counted since a load or store last named them (marks kept for
as many keys as the top tier holds, the oldest dropped first), so ``lookup``,
``load`` of the hits, ``store`` feeds it the same. A prefetch is no access.
Promotions and demotions are not accesses of their own: a promoted or demoted
block enters its new tier as the most recent one, as every stored block does.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from kvactors.actors import Actor
from kvactors.cache.events import CacheEvent, EventKind
from kvactors.cache.messages import (
    Adopt,
    Complete,
    Discover,
    Drop,
    GetSnapshot,
    LoadPlan,
    Lookup,
    MarkFailed,
    PolicyRequest,
    PrepareFlush,
    PrepareLoad,
    PrepareStore,
    Subscribe,
)
from kvactors.cache.placement import Placement, Recovered, Tiers, leading_store
from kvactors.cache.results import LookupResult, Snapshot
from kvactors.cache.transfers import Transfer
from kvactors.config import Config
from kvactors.errors import TierFailed
from kvactors.keys import Key
from kvactors.manager import OffloadingManager

__all__ = ["PolicyActor"]

_ABSENT = object()


class PolicyActor(Actor[PolicyRequest], Placement):
    """Owns the per-tier managers; see the module docstring. Arguments as
    :class:`~kvactors.cache.placement.Placement`'s."""

    def __init__(self, config: Config, tiers: Tiers, recovered: Recovered = ()) -> None:
        Actor.__init__(self, "policy", mailbox_size=config.mailbox_size)
        Placement.__init__(self, config, tiers, recovered)
        specs = dict(config.chain())
        # Keys a lookup counted as accessed that no load or store has named
        # since: the load that follows a lookup is the same access, not a second
        # one. At most as many as the top tier holds (the oldest marks go first).
        self._counted: dict[Key, None] = {}
        self._counted_max = specs[self.names[0]].num_blocks
        # Tiers written only on demotion (a remote written ``on_demotion``): the
        # keys ready above the deepest of them, in order stored, so closing the
        # cache can write them there (:meth:`prepare_flush`).
        lazy = [i for i in range(1, len(self.names)) if not self.through[i]]
        lazy = [
            i for i in lazy if getattr(specs[self.names[i]], "write_policy", "") == "on_demotion"
        ]
        self._lazy = max(lazy) if lazy else None
        self._unflushed: dict[Key, None] = {}
        self.corrupted = 0
        self.missing = 0
        # Per tier: keys lookups found there, and keys they looked for there in
        # vain (a key a lower tier held was looked for in each live tier above).
        self.lookup_found = [0] * len(self.names)
        self.lookup_missed = [0] * len(self.names)

    async def handle(self, message: PolicyRequest) -> Any:
        try:
            match message:  # the cases a handshake sends first: each one tried is a test
                case Complete(plan, done):
                    return self.complete(plan, done)
                case PrepareStore(keys):
                    if self._counted:  # a load after this store is an access of its own
                        for key in keys:
                            self._counted.pop(key, None)
                    return self.prepare_store(keys)
                case PrepareLoad(keys, partial, prefetch):
                    if partial:
                        hits = self.lookup(keys, touch=False).hits
                        if hits < len(keys) and self._moving(keys[hits]):
                            return self._wait_plan([keys[hits]])
                        # Every key named is an access, the loaded ones touched last
                        # (most recent) by prepare_load.
                        self._touch_rest(self._uncounted(keys[hits:]))
                        keys = keys[:hits]
                    # A prefetch is no access.
                    touch = None if prefetch else self._touch_pinned
                    return self.prepare_load(keys, prefetch=prefetch, touch=touch)
                case Lookup(keys):
                    return self.lookup(keys, touch=True)
                case Drop(tier, keys, corrupted, missing):
                    return self.drop(tier, keys, corrupted=corrupted, missing=missing)
                case MarkFailed(tier, retry_after):
                    return self.mark_failed(tier, retry_after)
                case Discover(tier, keys, adopt):
                    return self.discover(tier, keys, adopt=adopt)
                case Adopt(tier, keys):
                    return self.adopt(tier, keys)
                case PrepareFlush(tier, limit, skip):
                    return self.prepare_flush(tier, limit, skip)
                case Subscribe():
                    return self.hub.subscribe()
                case GetSnapshot():
                    return self.snapshot()
        finally:
            self._flush_events()

    async def on_stop(self) -> None:
        self.hub.close()
        for writing in self._writing.values():
            if writing.event is not None:
                writing.event.set()

    # -- accesses -----------------------------------------------------------------

    def lookup(self, keys: list[Key], *, touch: bool) -> LookupResult:
        # The leading keys ready in the top tier in one manager call; tier by
        # tier only from the first one that is not.
        hits = self.top.lookup(keys) if self.names[0] not in self.failed else 0
        found = [0] * hits
        if hits < len(keys) and len(self.managers) > 1:
            for key in keys[hits:]:
                tier = self._tier_of(key)
                if tier is None:
                    break
                found.append(tier)
        self._count_lookup(hits, found, len(found) < len(keys))
        if touch:
            self._touch_rest(keys[len(found) :])
            if found:
                self._touch(keys, found)
            self._count(keys)
        return LookupResult(len(found), [self.names[i] for i in found])

    def _count_lookup(self, hits: int, found: list[int], stopped: bool) -> None:
        """Count a lookup's keys per tier: ``found[j]`` is the tier that held key
        ``j`` (the first ``hits`` the top tier), each live tier above it missed
        it; ``stopped``: the key after them was in no live tier."""
        self.lookup_found[0] += hits
        if len(found) == hits and not stopped:
            return
        live = [i for i in range(len(self.names)) if self.names[i] not in self.failed]
        for tier in found[hits:]:
            self.lookup_found[tier] += 1
            for i in live:
                if i >= tier:
                    break
                self.lookup_missed[i] += 1
        if stopped:
            for i in live:
                self.lookup_missed[i] += 1

    def _touch(self, keys: list[Key], tiers: list[int]) -> None:
        """Count an access of ``keys[j]`` in tier ``tiers[j]``, the first key most recent."""
        if not any(tiers):  # all in the top tier
            self.top.touch(keys[: len(tiers)])
            return
        for i in sorted(set(tiers)):
            self.managers[i].touch([k for k, t in zip(keys, tiers) if t == i])

    def _count(self, keys: list[Key]) -> None:
        """Mark ``keys`` as counted by a lookup (the most recent marks last)."""
        counted = self._counted
        for key in keys:
            counted.pop(key, None)
            counted[key] = None
        excess = len(counted) - self._counted_max
        if excess > 0:
            for key in list(itertools.islice(counted, excess)):
                del counted[key]

    def _uncounted(self, keys: list[Key]) -> list[Key]:
        """The keys of a load that count as accessed: those no lookup counted since
        a load or store last named them. The marks of the others are used up."""
        counted = self._counted
        if not counted:
            return keys
        return [k for k in keys if counted.pop(k, _ABSENT) is _ABSENT]

    def _touch_pinned(self, tier: int, keys: list[Key]) -> None:
        """Count the access of blocks a load pinned in tier ``tier`` (those a
        lookup did not count already)."""
        fresh = self._uncounted(keys)
        if fresh:
            self.managers[tier].touch(fresh)

    def _touch_rest(self, keys: list[Key]) -> None:
        """Count an access of the keys a lookup or load names past its leading
        hits: each in the tier holding it ready, else in the top tier, where a
        policy that remembers evicted keys (ARC's ghosts) learns it was wanted."""
        if not keys:
            return
        if len(self.managers) == 1:
            self.top.touch(keys)
            return
        tiers = self._tiers_of(keys)
        self._touch(keys, [0 if t is None else t for t in tiers])

    def drop(
        self, tier: str, keys: list[Key], *, corrupted: bool, missing: bool = False
    ) -> list[Key]:
        removed = self._manager(tier).remove(keys)
        if missing and removed:
            self.missing += len(removed)
            self.hub.publish(CacheEvent("missing", tier, list(removed)))
        elif corrupted and removed:
            self.corrupted += len(removed)
            self.hub.publish(CacheEvent("corrupted", tier, list(removed)))
        return removed

    def mark_failed(self, tier: str, retry_after: float | None = None) -> None:
        self._manager(tier)
        self.failed.add(tier)
        if retry_after is None:
            self._retry_at.pop(tier, None)
        else:
            self._retry_at[tier] = time.monotonic() + retry_after

    def discover(self, tier: str, keys: list[Key], *, adopt: bool = False) -> list[Key]:
        """The keys no tier holds, to ask shared tier ``tier`` about (none while it
        is down); with ``adopt``, recorded as held there at once."""
        self._manager(tier)
        if self._retry_at:
            self._retry_due()
        if tier in self.failed:
            return []
        missing = keys
        for manager in self.managers:  # one pass per tier, not a generator per key
            missing = [k for k in missing if k not in manager]
        if adopt and missing:
            self.adopt(tier, missing)
        return missing

    def adopt(self, tier: str, keys: list[Key]) -> None:
        """Record ``keys`` as ready in shared tier ``tier``; to make room, the tier
        forgets the blocks it tracks that were used least recently (they stay
        on the server)."""
        manager = self._manager(tier)
        new = [k for k in keys if k not in manager]
        # More than the tier can track at once: the leading ones (a lookup's run
        # of hits, a partial load's prefix), rather than none.
        out, _ = leading_store(manager, new)
        if out is not None and out.block_hashes_to_store:
            manager.complete_store(out.block_hashes_to_store, success=True)

    def _manager(self, tier: str) -> OffloadingManager:
        if tier in self.names:
            return self.managers[self.names.index(tier)]
        raise TierFailed(f"no tier named {tier!r}")

    def _flush_events(self) -> None:
        hub = self.hub
        for manager in self.managers:
            events = manager.take_events()
            if not events:
                continue
            if not hub.subscribers and self._lazy is None:
                hub.published_unseen(len(events))  # nobody listens: counted, not built
                continue
            for ev in events:
                kind: EventKind = "removed" if ev.removed else "stored"
                hub.publish(CacheEvent(kind, ev.medium, ev.block_hashes))
                if self._lazy is not None:
                    self._note_unflushed(ev.medium, ev.block_hashes, ev.removed)

    def _note_unflushed(self, tier: str, keys: list[Key], removed: bool) -> None:
        """Keep ``_unflushed``: keys held above the ``on_demotion`` tier, not in it."""
        lazy = self._lazy
        assert lazy is not None
        pending = self._unflushed
        where = self.names.index(tier)
        if where == lazy:
            if not removed:
                for key in keys:
                    pending.pop(key, None)
        elif where < lazy:
            if not removed:
                for key in keys:
                    pending[key] = None
            else:
                above = self.managers[:lazy]
                for key in keys:
                    if key in pending and not any(key in m for m in above):
                        del pending[key]

    def prepare_flush(
        self, tier: str, limit: int, skip: frozenset[Key]
    ) -> tuple[LoadPlan | None, int]:
        """Write-back of blocks held ready above ``tier`` (written ``on_demotion``)
        that ``tier`` does not hold: up to ``limit`` of them, each from the
        shallowest tier holding it, pinned there until the plan completes; and
        how many are left after them."""
        dst = self.names.index(tier)
        if dst != self._lazy or not self._unflushed:
            return None, 0
        self._live(0)  # puts back tiers whose retry_after has passed
        target = self.managers[dst]
        chosen: dict[int, list[Key]] = {}
        n = left = 0
        for key in self._unflushed:
            if key in skip or key in target:
                continue
            src = self._tier_of(key)
            if src is None or src >= dst:
                continue
            if n < limit:
                chosen.setdefault(src, []).append(key)
                n += 1
            else:
                left += 1
        if not chosen or tier in self.failed:
            return None, n + left
        transfers: list[Transfer] = []
        pins: list[tuple[int, list[Key]]] = []
        for src, keys in sorted(chosen.items()):
            out = target.prepare_store(keys)
            if out is None or not out.block_hashes_to_store:
                continue
            written = out.block_hashes_to_store
            ids = self.managers[src].prepare_load(written).block_ids
            pins.append((src, written))
            transfers.append(
                Transfer(self.names[src], ids, tier, out.store_spec.block_ids, written, "through")
            )
        if not transfers:
            return None, n + left
        return LoadPlan([], [], transfers, pins), left

    def snapshot(self) -> Snapshot:
        return Snapshot(
            tiers={name: m.stats() for name, m in zip(self.names, self.managers)},
            failed=sorted(self.failed),
            promoted=self.promoted,
            demoted=self.demoted,
            demotions_lost=self.demotions_lost,
            demotions_declined=self.demotions_declined,
            corrupted=self.corrupted,
            missing=self.missing,
            lookup_found=dict(zip(self.names, self.lookup_found)),
            lookup_missed=dict(zip(self.names, self.lookup_missed)),
            events_published=self.hub.published,
            events_dropped=self.hub.dropped,
        )
