"""The policy actor: the one source of truth of which block is in which tier.

It wraps one synchronous :class:`~kvactors.manager.OffloadingManager` per tier
of the chain (``Config.chain()``: ``cpu``, then ``nvme`` when configured, then
any tier added after), so every handshake keeps the manager's semantics
exactly. It never moves bytes: a ``Prepare*`` returns a plan, an ordered list of
transfers the coordinator runs through the tier actors, and the matching
:class:`~kvactors.cache.messages.Complete` (sent even when the caller was
cancelled) settles the managers. Every handler is synchronous, so each request
is atomic with respect to every other.

Placement, for a chain ``t0, t1, ...`` (``t0`` the top, ``cpu``):

- stores land in ``t0``; with ``write_through`` each stored block is also
  written at once to every deeper tier (``through`` transfers);
- a block evicted from ``tk`` moves down to ``tk+1`` (``demote``) unless a
  deeper tier holds it already; evictions there cascade further down, and the
  deepest victims move first (their slots are the ones handed out above);
- a tier whose ``write_policy`` is ``"write_through"`` (the remote tier's
  default) gets those ``through`` transfers whatever ``write_mode`` says;
- a shared tier (a remote store other engines write too) is asked, through
  the coordinator, about keys no tier holds (``Discover``); those it has are
  recorded as held there (``Adopt``), so plans promote them like any block;
  before a load or prefetch they are recorded unasked (``Discover(adopt=True)``)
  and the read itself finds out which the server has;
- a tier that failed with a ``retry_after`` is left out for that long, then
  used again;
- a load takes each block from the shallowest tier holding it ready; a block
  held only below ``t0`` is promoted into ``t0`` when a slot can be had there
  (then copied from ``t0``), else read straight from its tier; a prefetch hint
  promotes the same way and loads nothing;
- a block being demoted is in no tier ready until its plan completes: a load
  of it (and a store of it) gets a plan that waits for that completion and
  asks again, so it is read from the tier it landed in (a failed demotion
  loses it: then it is a miss).

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
from collections.abc import Sequence
from typing import Any

import anyio

from kvactors.actors import Actor
from kvactors.cache.events import CacheEvent, EventHub, EventKind
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
    StorePlan,
    Subscribe,
)
from kvactors.cache.results import LookupResult, Snapshot
from kvactors.cache.transfers import CALLER, Role, Transfer
from kvactors.config import Config
from kvactors.errors import BlockNotFoundError, BlockNotReadyError, TierFailed
from kvactors.keys import Key
from kvactors.manager import OffloadingManager
from kvactors.media.nvme_index import NVMeIndex

__all__ = ["PolicyActor"]

_ABSENT = object()


class _Writing:
    """Keys whose bytes are in flight into a tier: one store plan's new keys, or
    one demotion's victims (``moving``). ``event`` is made (and set when the
    plan completes) only when another request waits for them."""

    __slots__ = ("event", "moving")

    def __init__(self, moving: bool = False) -> None:
        self.event: anyio.Event | None = None
        self.moving = moving


class PolicyActor(Actor[PolicyRequest]):
    """Owns the per-tier managers; see the module docstring.

    ``tiers``: ``(name, durable)`` of each tier of the chain, top first;
    ``recovered[i]``: the ``(key, slot)`` pairs tier ``i``'s medium still held
    when opened (verified when read), or the NVMe index that records them (the
    manager is then restored from the index itself: no object per entry).
    """

    def __init__(
        self,
        config: Config,
        tiers: Sequence[tuple[str, bool]],
        recovered: Sequence[Sequence[tuple[Key, int]] | NVMeIndex] = (),
    ) -> None:
        super().__init__("policy", mailbox_size=config.mailbox_size)
        self.write_through = config.write_mode == "write_through"
        specs = dict(config.chain())
        self.names = [name for name, _ in tiers]
        self.index = {name: i for i, name in enumerate(self.names)}
        self.durable = [durable for _, durable in tiers]
        self.managers = [
            OffloadingManager(
                specs[name].num_blocks,
                block_size=config.block_bytes,
                policy=specs[name].policy,
                enable_events=True,
                medium=name,
            )
            for name in self.names
        ]
        for manager, found in zip(self.managers, recovered):
            if isinstance(found, NVMeIndex):
                manager.restore_index(found)
            else:
                manager.restore(found)
        self.top = self.managers[0]
        self.hub = EventHub(config.event_buffer)
        self.failed: set[str] = set()
        self._retry_at: dict[str, float] = {}  # failed tiers tried again from then on
        # Tiers written at every store (``write_through``), by position in the chain.
        self.through = [
            self.write_through or getattr(specs[name], "write_policy", "") == "write_through"
            for name in self.names
        ]
        self._writing: dict[Key, _Writing] = {}
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
        self.promoted = 0
        self.demoted = 0
        self.demotions_lost = 0
        self.demotions_declined = 0
        self.corrupted = 0
        self.missing = 0

    async def handle(self, message: PolicyRequest) -> Any:
        try:
            match message:  # the cases a handshake sends first: each one tried is a test
                case Complete(plan, done):
                    return self.complete(plan, done)
                case PrepareStore(keys):
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
                    return self.prepare_load(keys, prefetch=prefetch)
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

    # -- the chain ----------------------------------------------------------------

    def _live(self, start: int) -> list[int]:
        """Indexes of the tiers from ``start`` down that are not failed."""
        if self._retry_at:
            self._retry_due()
        return [i for i in range(start, len(self.managers)) if self.names[i] not in self.failed]

    def _retry_due(self) -> None:
        """Put back the failed tiers whose ``retry_after`` has passed."""
        now = time.monotonic()
        for name, at in list(self._retry_at.items()):
            if now >= at:
                del self._retry_at[name]
                self.failed.discard(name)

    def _tier_of(self, key: Key, start: int = 0) -> int | None:
        """The shallowest live tier from ``start`` down holding ``key`` ready."""
        for i in self._live(start):
            block = self.managers[i].get(key)
            if block is not None and block.ref_cnt >= 0:
                return i
        return None

    def _held_below(self, key: Key, start: int) -> bool:
        return any(key in self.managers[i] for i in self._live(start))

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
        if touch:
            self._touch_rest(keys[len(found) :])
            if found:
                self._touch(keys, found)
            self._count(keys)
        return LookupResult(len(found), [self.names[i] for i in found])

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

    def _touch_rest(self, keys: list[Key]) -> None:
        """Count an access of the keys a lookup or load names past its leading
        hits: each in the tier holding it ready, else in the top tier, where a
        policy that remembers evicted keys (ARC's ghosts) learns it was wanted."""
        if not keys:
            return
        if len(self.managers) == 1:
            self.top.touch(keys)
            return
        tiers = [self._tier_of(k) for k in keys]
        self._touch(keys, [0 if t is None else t for t in tiers])

    def _demote(self, tier: int, keys: list[Key], ids: list[int]) -> list[Transfer]:
        """Transfers that move ``tier``'s victims ``keys`` (in slots ``ids``) down one
        tier, the cascade they cause below them first."""
        if not keys:
            return []
        below = self._live(tier + 1)
        if not below:
            self.demotions_lost += len(keys)
            return []
        nxt = below[0]
        wanted = [k for k in keys if not self._held_below(k, nxt + 1)]
        out = self.managers[nxt].prepare_store(wanted) if wanted else None
        if out is None:
            # The next tier is full of pinned / in-flight blocks: the victims are dropped.
            self.demotions_lost += len(wanted)
            return []
        moved = out.block_hashes_to_store
        if len(moved) < len(wanted):
            # The next tier's admission declined some victims: they leave the cache.
            below_tier = self.managers[nxt]
            self.demotions_declined += sum(1 for k in wanted if k not in below_tier)
        if not moved:
            return []
        slot_of = dict(zip(keys, ids))
        # In flight until the plan completes: a load or store of them waits.
        self._writing.update(dict.fromkeys(moved, _Writing(moving=True)))
        down = Transfer(
            self.names[tier],
            [slot_of[k] for k in moved],
            self.names[nxt],
            out.store_spec.block_ids,
            moved,
            "demote",
        )
        return [*self._demote(nxt, out.block_hashes_evicted, out.block_ids_evicted), down]

    def prepare_store(self, keys: list[Key]) -> StorePlan | None:
        if self.names[0] in self.failed:
            raise TierFailed(f"tier {self.names[0]!r} is down: nothing can be stored")
        if self._counted:  # a load after this store is an access of its own
            for key in keys:
                self._counted.pop(key, None)
        # A key held anywhere is not stored again. Keys already in the top tier
        # stay in the call, so the manager protects them from this call's evictions.
        top = self.top
        if len(self.managers) > 1:
            candidates = [k for k in keys if k in top or not self._held_below(k, 1)]
        else:
            candidates = keys
        out = top.prepare_store(candidates)
        if out is None:
            return None
        new = out.block_hashes_to_store
        writing = self._writing
        busy = [k for k in keys if k in writing] if writing else []
        wait = list({id(w): w for w in (writing[k] for k in busy)}.values()) if busy else []
        if len(new) == len(keys):
            index = list(range(len(keys)))  # all new, in key order
        else:
            pos_of = {k: i for i, k in enumerate(keys)}
            index = [pos_of[k] for k in new]
        ids = out.store_spec.block_ids
        evicted = out.block_hashes_evicted
        transfers = self._demote(0, evicted, out.block_ids_evicted) if evicted else []
        if new:
            transfers.append(Transfer(CALLER, index, self.names[0], ids, new, "store"))
            writing.update(dict.fromkeys(new, _Writing()))
        if new and any(self.through[1:]):
            slot_of = dict(zip(new, ids))
            for i in self._live(1):
                if not self.through[i]:
                    continue
                through = self.managers[i].prepare_store(new)
                if through is None or not through.block_hashes_to_store:
                    continue
                transfers += self._demote(
                    i, through.block_hashes_evicted, through.block_ids_evicted
                )
                written = through.block_hashes_to_store
                transfers.append(
                    Transfer(
                        self.names[0],
                        [slot_of[k] for k in written],
                        self.names[i],
                        through.store_spec.block_ids,
                        written,
                        "through",
                    )
                )
        return StorePlan(keys, new, transfers, busy, [self._event(w) for w in wait] if wait else [])

    @staticmethod
    def _event(writing: _Writing) -> anyio.Event:
        if writing.event is None:
            writing.event = anyio.Event()
        return writing.event

    def prepare_load(self, keys: list[Key], *, prefetch: bool) -> LoadPlan:
        top, top_name = self.top, self.names[0]
        if not prefetch and keys and top_name not in self.failed:
            # Commonly every block is ready in the top tier: pin them in one
            # manager call, which pins nothing when one is not.
            try:
                ids = top.prepare_load(keys).block_ids
            except (BlockNotFoundError, BlockNotReadyError):
                pass
            else:
                fresh = self._uncounted(keys)
                if fresh:
                    top.touch(fresh)
                move = Transfer(top_name, ids, CALLER, list(range(len(keys))), keys, "load")
                return LoadPlan(keys, [top_name] * len(keys), [move], [(0, keys)])
        where: list[int] = []
        moving: list[Key] = []
        for key in keys:
            tier = self._tier_of(key)
            if tier is None:
                if prefetch:
                    where.append(-1)
                    continue
                if self._moving(key):
                    moving.append(key)  # being demoted: held again once it lands
                    continue
                raise BlockNotFoundError(f"load: block {key!r} is not available in any tier")
            where.append(tier)
        if moving:
            return self._wait_plan(moving)
        groups: dict[int, list[int]] = {}
        for pos, tier in enumerate(where):
            if tier >= 0 and not (prefetch and tier == 0):
                groups.setdefault(tier, []).append(pos)
        pins: list[tuple[int, list[Key]]] = []
        slot: dict[int, tuple[int, int]] = {}  # position -> (tier, slot id), pinned
        for tier, positions in sorted(groups.items()):
            tkeys = [keys[p] for p in positions]
            tids = self.managers[tier].prepare_load(tkeys).block_ids
            fresh = [] if prefetch else self._uncounted(tkeys)  # a prefetch is no access
            if fresh:
                self.managers[tier].touch(fresh)
            pins.append((tier, tkeys))
            slot.update(zip(positions, ((tier, i) for i in tids)))
        deep = [p for p in sorted(slot) if slot[p][0] > 0]
        transfers: list[Transfer] = []
        up: dict[int, int] = {}  # position -> top slot it is promoted into
        if deep and top_name not in self.failed:
            out = top.prepare_store([keys[p] for p in deep])
            if out is not None:
                given = dict(zip(out.block_hashes_to_store, out.store_spec.block_ids))
                up = {p: given[keys[p]] for p in deep if keys[p] in given}
                transfers += self._demote(0, out.block_hashes_evicted, out.block_ids_evicted)
        transfers += self._from_tiers(keys, list(up), slot, top_name, up, "promote")
        if prefetch:
            return LoadPlan([], [], transfers, pins)
        from_top = [p for p in range(len(keys)) if where[p] == 0 or p in up]
        if from_top:
            transfers.append(
                Transfer(
                    top_name,
                    [up[p] if p in up else slot[p][1] for p in from_top],
                    CALLER,
                    from_top,
                    [keys[p] for p in from_top],
                    "load",
                )
            )
        straight = [p for p in deep if p not in up]
        # Into the request's own side, named by positions.
        transfers += self._from_tiers(
            keys, straight, slot, CALLER, {p: p for p in straight}, "load"
        )
        return LoadPlan(keys, [self.names[t] for t in where], transfers, pins)

    def _from_tiers(
        self,
        keys: list[Key],
        positions: list[int],
        slot: dict[int, tuple[int, int]],
        dst: str,
        dst_id: dict[int, int],
        role: Role,
    ) -> list[Transfer]:
        """One transfer per tier the blocks at ``positions`` are read from
        (``slot[p]``: its tier and slot there) into ``dst``'s slots ``dst_id[p]``."""
        out: list[Transfer] = []
        for tier in sorted({slot[p][0] for p in positions}):
            group = [p for p in positions if slot[p][0] == tier]
            src_ids = [slot[p][1] for p in group]
            dst_ids = [dst_id[p] for p in group]
            out.append(
                Transfer(self.names[tier], src_ids, dst, dst_ids, [keys[p] for p in group], role)
            )
        return out

    def _moving(self, key: Key) -> bool:
        """Whether ``key`` is being demoted (in no tier ready until it lands)."""
        mark = self._writing.get(key)
        return mark is not None and mark.moving

    def _wait_plan(self, keys: list[Key]) -> LoadPlan:
        """A plan that pins nothing and waits for the demotions of ``keys``."""
        marks = {id(m): m for m in map(self._writing.__getitem__, keys)}
        return LoadPlan([], [], [], [], [self._event(m) for m in marks.values()])

    def complete(self, plan: StorePlan | LoadPlan, done: list[bool]) -> list[Key]:
        index = self.index
        for transfer, ok in zip(plan.transfers, done):
            tier = index.get(transfer.dst)
            if tier is None:
                continue
            self.managers[tier].complete_store(transfer.keys, success=ok)
            if transfer.role == "demote":
                self._landed(transfer.keys)
                if ok:
                    self.demoted += len(transfer.keys)
                    self.hub.publish(CacheEvent("demoted", transfer.dst, list(transfer.keys)))
                else:
                    self.demotions_lost += len(transfer.keys)
            elif transfer.role == "promote" and ok:
                self.promoted += len(transfer.keys)
                self.hub.publish(CacheEvent("promoted", transfer.dst, list(transfer.keys)))
        for tier, keys in plan.pins:
            self.managers[tier].complete_load(keys)
        if not isinstance(plan, StorePlan):
            return []
        self._landed(plan.new)
        if True not in self.durable:
            return []
        durable = [i for i in self._live(0) if self.durable[i]]
        if not durable:
            return []
        return [k for k in plan.keys if any(self._ready(i, k) for i in durable)]

    def _landed(self, keys: list[Key]) -> None:
        """``keys`` (a store's new keys, or one demotion's) are no longer in flight;
        whoever waits for their mark goes on."""
        if keys:
            marks = list(map(self._writing.pop, keys, itertools.repeat(None)))
            mark = marks[0]
            if mark is not None and mark.event is not None:
                mark.event.set()

    def _ready(self, tier: int, key: Key) -> bool:
        block = self.managers[tier].get(key)
        return block is not None and block.ref_cnt >= 0

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
        missing = [k for k in keys if not any(k in m for m in self.managers)]
        if adopt and missing:
            self.adopt(tier, missing)
        return missing

    def adopt(self, tier: str, keys: list[Key]) -> None:
        """Record ``keys`` as ready in shared tier ``tier``; to make room, the tier
        forgets the blocks it tracks that were used least recently (they stay
        on the server)."""
        manager = self._manager(tier)
        new = [k for k in keys if k not in manager]
        out = manager.prepare_store(new) if new else None
        if out is not None and out.block_hashes_to_store:
            manager.complete_store(out.block_hashes_to_store, success=True)

    def _manager(self, tier: str) -> OffloadingManager:
        if tier in self.names:
            return self.managers[self.names.index(tier)]
        raise TierFailed(f"no tier named {tier!r}")

    def _flush_events(self) -> None:
        for manager in self.managers:
            for ev in manager.take_events():
                kind: EventKind = "removed" if ev.removed else "stored"
                self.hub.publish(CacheEvent(kind, ev.medium, ev.block_hashes))
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
            events_published=self.hub.published,
            events_dropped=self.hub.dropped,
        )
