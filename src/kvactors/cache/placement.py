"""Placement: which block is in which tier of the chain, and the plans that move them.

:class:`Placement` holds one synchronous :class:`~kvactors.manager.OffloadingManager`
per tier of the chain (``Config.chain()``: ``cpu``, then ``nvme`` when
configured, then any tier added after), so every handshake keeps the manager's
semantics exactly, and builds each handshake's plan: ``prepare_store`` /
``prepare_load`` return an ordered list of transfers (never moving a byte),
``complete`` settles the managers with what succeeded. The policy actor
(:mod:`kvactors.cache.policy_actor`) is the one place that calls it, one
message at a time, so each plan is atomic with respect to every other.

For a chain ``t0, t1, ...`` (``t0`` the top, ``cpu``):

- stores land in ``t0``; with ``write_through`` each stored block is also
  written at once to every deeper tier (``through`` transfers);
- a block evicted from ``tk`` moves down to ``tk+1`` (``demote``) unless a
  deeper tier holds it already; evictions there cascade further down, and the
  deepest victims move first (their slots are the ones handed out above);
- a tier whose ``write_policy`` is ``"write_through"`` (the remote tier's
  default) gets those ``through`` transfers whatever ``write_mode`` says;
- the NVMe tier never gets a key longer than its index holds
  (:data:`~kvactors.media.index_format.MAX_KEY_BYTES`): such a key is left out
  of that tier's ``through`` transfer (the call's other keys are written) and,
  evicted from the tier above, dropped (``demotions_lost``), not demoted;
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

Promotions and demotions are not accesses: a promoted or demoted block enters
its new tier as the most recent one, as every stored block does. A load's
pins are counted as accesses by the policy actor (``prepare_load``'s ``touch``).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence

import anyio

from kvactors.cache.events import CacheEvent, EventHub
from kvactors.cache.messages import LoadPlan, StorePlan
from kvactors.cache.transfers import CALLER, Role, Transfer
from kvactors.config import Config, NVMeConfig
from kvactors.errors import BlockNotFoundError, BlockNotReadyError, TierFailed
from kvactors.keys import Key
from kvactors.manager import OffloadingManager, PrepareStoreOutput
from kvactors.media.index_format import fitting
from kvactors.media.nvme_index import NVMeIndex

__all__ = ["Placement", "Recovered", "Tiers"]

Tiers = Sequence[tuple[str, bool]]
"""``(name, durable)`` of each tier of the chain, top first."""

Recovered = Sequence[Sequence[tuple[Key, int]] | NVMeIndex]
"""Per tier, what its medium held when opened: ``(key, slot)`` pairs, or the NVMe index."""


def leading_store(
    manager: OffloadingManager, keys: list[Key]
) -> tuple[PrepareStoreOutput | None, int]:
    """``manager.prepare_store(keys)`` and how many of ``keys`` it was given: where
    the tier has no room for all of them at once (more than it holds beside its
    blocks in use), the leading ones, as many as fit, rather than none."""
    if not keys:
        return None, 0
    out = manager.prepare_store(keys)
    if out is None:
        st = manager.stats()
        room = st.capacity - st.pinned - st.being_written
        if 0 < room < len(keys):
            return manager.prepare_store(keys[:room]), room
    return out, len(keys)


class _Writing:
    """Keys whose bytes are in flight into a tier: one store plan's new keys, or
    one demotion's victims (``moving``). ``event`` is made (and set when the
    plan completes) only when another request waits for them."""

    __slots__ = ("event", "moving")

    def __init__(self, moving: bool = False) -> None:
        self.event: anyio.Event | None = None
        self.moving = moving


class Placement:
    """The chain's managers and the plans of every handshake; see the module docstring.

    ``tiers``: ``(name, durable)`` of each tier of the chain, top first;
    ``recovered[i]``: the ``(key, slot)`` pairs tier ``i``'s medium still held
    when opened (verified when read), or the NVMe index that records them (the
    manager is then restored from the index itself: no object per entry).
    """

    def __init__(self, config: Config, tiers: Tiers, recovered: Recovered = ()) -> None:
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
        self._all = range(len(self.managers))
        self.hub = EventHub(config.event_buffer)
        self.failed: set[str] = set()
        self._retry_at: dict[str, float] = {}  # failed tiers tried again from then on
        # Tiers written at every store (``write_through``), by position in the chain.
        self.through = [
            self.write_through or getattr(specs[name], "write_policy", "") == "write_through"
            for name in self.names
        ]
        # Tiers whose index bounds a key's length (NVMe), by position in the chain.
        self.bounded = [isinstance(specs[name], NVMeConfig) for name in self.names]
        self._writing: dict[Key, _Writing] = {}
        self.promoted = 0
        self.demoted = 0
        self.demotions_lost = 0
        self.demotions_declined = 0

    def _live(self, start: int) -> Sequence[int]:
        """Indexes of the tiers from ``start`` down that are not failed (not to
        be changed by the caller: while no tier failed, one kept range)."""
        if self._retry_at:
            self._retry_due()
        if not self.failed:
            return self._all[start:]
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
        return self._tiers_of([key], start)[0]

    def _tiers_of(self, keys: list[Key], start: int = 0) -> list[int | None]:
        """:meth:`_tier_of` of each of ``keys``, the live tiers looked up once."""
        managers = [(i, self.managers[i]) for i in self._live(start)]
        out: list[int | None] = []
        for key in keys:
            found = None
            for i, manager in managers:
                block = manager.get(key)
                if block is not None and block.ref_cnt >= 0:
                    found = i
                    break
            out.append(found)
        return out

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
        deeper = [self.managers[i] for i in self._live(nxt + 1)]
        wanted = [k for k in keys if not any(k in m for m in deeper)] if deeper else keys
        if self.bounded[nxt]:
            fit = fitting(wanted)
            # Keys too long for the next tier's index are dropped, the others moved.
            self.demotions_lost += len(wanted) - len(fit)
            wanted = fit
        out, taken = leading_store(self.managers[nxt], wanted)
        if out is not None and taken < len(wanted):
            # More victims than the next tier had room for: the rest are dropped.
            self.demotions_lost += len(wanted) - taken
            wanted = wanted[:taken]
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
        # A key held anywhere is not stored again. Keys already in the top tier
        # stay in the call, so the manager protects them from this call's evictions.
        top = self.top
        below = [self.managers[i] for i in self._live(1)]
        if len(below) == 1:
            (held,) = below
            candidates = [k for k in keys if k in top or k not in held]
        elif below:
            candidates = [k for k in keys if k in top or not any(k in m for m in below)]
        else:
            candidates = keys
        out = top.prepare_store(candidates)
        if out is None:
            return None
        new = out.block_hashes_to_store
        # An admitting policy may decline some of the missing keys: written
        # nowhere, so neither stored nor present (the candidates it did not
        # take are the only ones left out of the top tier).
        declined = sum(1 for k in candidates if k not in top) if len(new) < len(candidates) else 0
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
                # A key too long for the tier's index stays out; the others go.
                fit = fitting(new) if self.bounded[i] else new
                through, _ = leading_store(self.managers[i], fit)
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
        return StorePlan(
            keys,
            new,
            transfers,
            busy,
            [self._event(w) for w in wait] if wait else [],
            declined=declined,
        )

    @staticmethod
    def _event(writing: _Writing) -> anyio.Event:
        if writing.event is None:
            writing.event = anyio.Event()
        return writing.event

    def prepare_load(
        self,
        keys: list[Key],
        *,
        prefetch: bool,
        touch: Callable[[int, list[Key]], None] | None = None,
    ) -> LoadPlan:
        """Pin ``keys`` where they are read from and plan their reads (a
        ``prefetch``: only the promotions); ``touch(tier, keys)`` is told each
        group pinned, as it is pinned (the loaded keys' access)."""
        top, top_name = self.top, self.names[0]
        if not prefetch and keys and top_name not in self.failed:
            # Commonly every block is ready in the top tier: pin them in one
            # manager call, which pins nothing when one is not.
            try:
                ids = top.prepare_load(keys).block_ids
            except (BlockNotFoundError, BlockNotReadyError):
                pass
            else:
                if touch is not None:
                    touch(0, keys)
                move = Transfer(top_name, ids, CALLER, list(range(len(keys))), keys, "load")
                return LoadPlan(keys, [top_name] * len(keys), [move], [(0, keys)])
        where: list[int] = []
        moving: list[Key] = []
        for key, tier in zip(keys, self._tiers_of(keys)):
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
            if touch is not None:
                touch(tier, tkeys)
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
        durable = [self.managers[i] for i in self._live(0) if self.durable[i]]
        if not durable:
            return []
        out: list[Key] = []
        for key in plan.keys:
            for manager in durable:
                block = manager.get(key)
                if block is not None and block.ref_cnt >= 0:
                    out.append(key)
                    break
        return out

    def _landed(self, keys: list[Key]) -> None:
        """``keys`` (a store's new keys, or one demotion's) are no longer in flight;
        whoever waits for their mark goes on."""
        if keys:
            marks = list(map(self._writing.pop, keys, itertools.repeat(None)))
            mark = marks[0]
            if mark is not None and mark.event is not None:
                mark.event.set()
