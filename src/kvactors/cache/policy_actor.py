"""The policy actor: the one source of truth of which block is in which tier.

It wraps one synchronous :class:`~kvactors.manager.OffloadingManager` per cache
tier (``cpu`` and, when configured, ``nvme``), so every handshake keeps the
manager's semantics exactly. It never moves bytes: each ``Prepare*`` returns a
plan the coordinator carries out through the tier actors, and the matching
``Complete*`` (sent even when the caller was cancelled) settles the managers.

Placement:
- stores land in ``cpu``; with ``write_through`` each stored block also gets an
  ``nvme`` slot at once;
- blocks evicted from ``cpu`` are demoted to ``nvme`` unless already there
  (``write_back``; under ``write_through`` they normally are);
- a load of a block only in ``nvme`` promotes it into ``cpu`` when a slot can be
  had, and so does a prefetch hint.

A plan's ``demote`` part must be copied before the plan's new ``cpu`` blocks are
written: the victims' ``cpu`` slots are the ones handed to the new blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from kvactors.actors import NOT_NOW, Actor
from kvactors.cache.events import CacheEvent, EventHub, EventKind
from kvactors.config import Config
from kvactors.errors import BlockNotFoundError, BlockNotReadyError, TierFailed
from kvactors.keys import Key
from kvactors.manager import ManagerStats, OffloadingManager

__all__ = [
    "CompleteLoad",
    "CompleteStore",
    "Demotion",
    "Drop",
    "LoadPlan",
    "Lookup",
    "LookupResult",
    "MarkFailed",
    "PolicyActor",
    "PolicyRequest",
    "PrepareLoad",
    "PrepareStore",
    "Snapshot",
    "StorePlan",
]

CPU, NVME = "cpu", "nvme"


# -- plans ------------------------------------------------------------------------


class Demotion(msgspec.Struct, frozen=True):
    """Victims of a ``cpu`` eviction to copy ``cpu_ids[i] -> nvme_ids[i]`` first."""

    keys: list[Key]
    cpu_ids: list[int]
    nvme_ids: list[int]


class StorePlan(msgspec.Struct, frozen=True):
    """Write ``src[index[i]]`` into ``cpu`` slot ``cpu_ids[i]`` for each ``keys[i]``;
    with write-through, also ``through_pos[j]``-th new block into ``nvme`` slot
    ``through_ids[j]``."""

    keys: list[Key]
    index: list[int]
    cpu_ids: list[int]
    demote: Demotion | None
    through_keys: list[Key]
    through_pos: list[int]
    through_ids: list[int]


class LoadPlan(msgspec.Struct, frozen=True):
    """Where each requested block comes from.

    - ``cpu_*``: ready in ``cpu`` (pinned), copy ``cpu_ids`` to ``cpu_pos``;
    - ``promote_*``: only in ``nvme`` (pinned there); read ``nvme_ids`` into the
      new ``cpu`` slots ``cpu_ids`` (not ready yet), then copy them to ``pos``;
    - ``direct_*``: only in ``nvme`` with no ``cpu`` slot to be had: read
      ``nvme_ids`` straight to ``pos``.
    """

    cpu_keys: list[Key]
    cpu_ids: list[int]
    cpu_pos: list[int]
    promote_keys: list[Key]
    promote_nvme_ids: list[int]
    promote_cpu_ids: list[int]
    promote_pos: list[int]
    direct_keys: list[Key]
    direct_nvme_ids: list[int]
    direct_pos: list[int]
    demote: Demotion | None


class LookupResult(msgspec.Struct, frozen=True):
    """``hits`` leading keys are available; ``tiers[i]`` says where key ``i`` is."""

    hits: int
    tiers: list[str]


class Snapshot(msgspec.Struct, frozen=True):
    """The managers' stats, the failed tiers and placement counters."""

    tiers: dict[str, ManagerStats]
    failed: list[str]
    promoted: int
    demoted: int
    demotions_lost: int
    corrupted: int
    events_published: int
    events_dropped: int


# -- messages ---------------------------------------------------------------------


class Lookup(msgspec.Struct, frozen=True, tag=True):
    keys: list[Key]


class PrepareStore(msgspec.Struct, frozen=True, tag=True):
    """Plan a store of ``keys``. ``local=True``: only a plan that touches no
    ``nvme`` slot (no demotion, no write-through); otherwise ``NOT_NOW`` is the
    answer and nothing changed."""

    keys: list[Key]
    local: bool = False


class CompleteStore(msgspec.Struct, frozen=True, tag=True):
    plan: StorePlan
    stored: bool
    demoted: bool
    through: bool


class PrepareLoad(msgspec.Struct, frozen=True, tag=True):
    """Pin ``keys`` for reading. ``prefetch=True`` plans only promotions of
    ``nvme``-only keys and skips (instead of failing on) absent ones.
    ``partial=True`` pins the longest leading run of available keys only.
    ``local=True``: only when every key is ready in ``cpu``; otherwise the
    answer is ``NOT_NOW`` and nothing is pinned."""

    keys: list[Key]
    promote: bool = True
    prefetch: bool = False
    partial: bool = False
    local: bool = False


class CompleteLoad(msgspec.Struct, frozen=True, tag=True):
    plan: LoadPlan
    promoted: bool
    demoted: bool


class Drop(msgspec.Struct, frozen=True, tag=True):
    """Remove idle ``keys`` from ``tier`` (e.g. a block that failed its checksum)."""

    tier: str
    keys: list[Key]
    corrupted: bool = False


class MarkFailed(msgspec.Struct, frozen=True, tag=True):
    """Stop placing blocks in ``tier``: it crashed. Its blocks count as absent."""

    tier: str


class Subscribe(msgspec.Struct, frozen=True, tag=True):
    pass


class GetSnapshot(msgspec.Struct, frozen=True, tag=True):
    pass


PolicyRequest = (
    Lookup
    | PrepareStore
    | CompleteStore
    | PrepareLoad
    | CompleteLoad
    | Drop
    | MarkFailed
    | Subscribe
    | GetSnapshot
)


class PolicyActor(Actor[PolicyRequest]):
    """Owns the per-tier managers; handlers are synchronous inside, so every
    request is atomic with respect to every other, and an idle policy actor
    answers an ``ask`` in the asker's task (:meth:`Actor.handle_now`)."""

    def __init__(self, config: Config, recovered: Sequence[tuple[Key, int]] = ()) -> None:
        super().__init__("policy", mailbox_size=config.mailbox_size)
        self.write_through = config.write_mode == "write_through"
        self.cpu = OffloadingManager(
            config.cpu.num_blocks,
            block_size=config.block_bytes,
            policy=config.cpu.policy,
            enable_events=True,
            medium=CPU,
        )
        self.nvme: OffloadingManager | None = None
        if config.nvme is not None:
            self.nvme = OffloadingManager(
                config.nvme.num_blocks,
                block_size=config.block_bytes,
                policy=config.nvme.policy,
                enable_events=True,
                medium=NVME,
            )
            # Blocks a reopened NVMe directory still holds (verified when read).
            self.nvme.restore(recovered)
        self.hub = EventHub(config.event_buffer)
        self.failed: set[str] = set()
        self.promoted = 0
        self.demoted = 0
        self.demotions_lost = 0
        self.corrupted = 0

    async def handle(self, message: PolicyRequest) -> Any:
        return self.handle_now(message)

    def handle_now(self, message: PolicyRequest) -> Any:
        # Every request is answered without awaiting, so an idle policy actor
        # serves an ``ask`` in the asker's task (see ``kvactors.actors``).
        try:
            match message:
                case Lookup(keys):
                    return self.lookup(keys)
                case PrepareStore(keys, local):
                    if local and not self._store_is_local(keys):
                        return NOT_NOW
                    return self.prepare_store(keys)
                case CompleteStore(plan, stored, demoted, through):
                    return self.complete_store(plan, stored, demoted, through)
                case PrepareLoad(keys, promote, prefetch, partial, local):
                    if local:
                        return self._prepare_local_load(keys)
                    if partial:
                        keys = keys[: self.lookup(keys).hits]
                    return self.prepare_load(keys, promote=promote, prefetch=prefetch)
                case CompleteLoad(plan, promoted, demoted):
                    return self.complete_load(plan, promoted, demoted)
                case Drop(tier, keys, corrupted):
                    return self.drop(tier, keys, corrupted=corrupted)
                case MarkFailed(tier):
                    return self.mark_failed(tier)
                case Subscribe():
                    return self.hub.subscribe()
                case GetSnapshot():
                    return self.snapshot()
        finally:
            self._flush_events()

    async def on_stop(self) -> None:
        self.hub.close()

    # -- the logic, synchronous ---------------------------------------------------

    def _nvme(self) -> OffloadingManager | None:
        return None if self.nvme is None or NVME in self.failed else self.nvme

    def _tier_of(self, key: Key) -> str | None:
        block = self.cpu.get(key)
        if block is not None and block.ref_cnt >= 0:
            return CPU
        nvme = self._nvme()
        if nvme is not None:
            block = nvme.get(key)
            if block is not None and block.ref_cnt >= 0:
                return NVME
        return None

    def lookup(self, keys: list[Key]) -> LookupResult:
        # The leading keys ready in ``cpu`` in one manager call; key by key
        # only from the first one that is not.
        hits = self.cpu.lookup(keys)
        tiers = [CPU] * hits
        if hits < len(keys) and self._nvme() is not None:
            for key in keys[hits:]:
                tier = self._tier_of(key)
                if tier is None:
                    break
                tiers.append(tier)
        return LookupResult(len(tiers), tiers)

    def _demote(self, keys: list[Key], cpu_ids: list[int]) -> Demotion | None:
        """Plan the write-back of ``cpu`` victims that ``nvme`` does not hold yet."""
        if not keys:
            return None
        nvme = self._nvme()
        if nvme is None:
            self.demotions_lost += len(keys)
            return None
        out = nvme.prepare_store(keys)
        if out is None:
            # NVMe is full of pinned / in-flight blocks: the victims are dropped.
            self.demotions_lost += len(keys)
            return None
        if not out.block_hashes_to_store:
            return None
        slot_of = dict(zip(keys, cpu_ids))
        return Demotion(
            out.block_hashes_to_store,
            [slot_of[k] for k in out.block_hashes_to_store],
            out.store_spec.block_ids,
        )

    def prepare_store(self, keys: list[Key]) -> StorePlan | None:
        # A key held anywhere is not stored again. Keys already in ``cpu`` stay in
        # the call so the manager protects them from this call's evictions.
        nvme = self._nvme()
        candidates = keys if nvme is None else [k for k in keys if k in self.cpu or k not in nvme]
        out = self.cpu.prepare_store(candidates)
        if out is None:
            return None
        new = out.block_hashes_to_store
        if len(new) == len(keys):
            index = list(range(len(keys)))  # all new, in key order
        else:
            pos_of = {k: i for i, k in enumerate(keys)}
            index = [pos_of[k] for k in new]
        demote = self._demote(out.block_hashes_evicted, out.block_ids_evicted)
        through_keys: list[Key] = []
        through_pos: list[int] = []
        through_ids: list[int] = []
        if self.write_through and new and nvme is not None:
            nout = nvme.prepare_store(new)
            if nout is not None:
                through_keys = nout.block_hashes_to_store
                new_pos = {k: i for i, k in enumerate(new)}
                through_pos = [new_pos[k] for k in through_keys]
                through_ids = nout.store_spec.block_ids
        return StorePlan(
            new, index, out.store_spec.block_ids, demote, through_keys, through_pos, through_ids
        )

    def _complete_demotion(self, demote: Demotion | None, ok: bool) -> None:
        if demote is None or self.nvme is None:
            return
        self.nvme.complete_store(demote.keys, success=ok)
        if ok:
            self.demoted += len(demote.keys)
            self.hub.publish(CacheEvent("demoted", NVME, list(demote.keys)))
        else:
            self.demotions_lost += len(demote.keys)

    def complete_store(self, plan: StorePlan, stored: bool, demoted: bool, through: bool) -> None:
        self._complete_demotion(plan.demote, demoted)
        self.cpu.complete_store(plan.keys, success=stored)
        if plan.through_keys and self.nvme is not None:
            self.nvme.complete_store(plan.through_keys, success=through and stored)

    def _store_is_local(self, keys: list[Key]) -> bool:
        """Whether storing ``keys`` now needs no ``nvme`` transfer: no NVMe tier,
        or no write-through and room in ``cpu`` without evicting (a victim
        would be demoted)."""
        nvme = self._nvme()
        if nvme is None:
            return True
        if self.write_through:
            return False
        cpu = self.cpu
        new = sum(1 for k in keys if k not in cpu and k not in nvme)
        return new <= cpu.num_free_blocks

    def _prepare_local_load(self, keys: list[Key]) -> Any:
        """Pin ``keys`` if every one is ready in ``cpu``; else ``NOT_NOW``, nothing pinned."""
        try:
            cpu_ids = self.cpu.prepare_load(keys).block_ids
        except (BlockNotFoundError, BlockNotReadyError):
            return NOT_NOW
        return LoadPlan(keys, cpu_ids, list(range(len(keys))), [], [], [], [], [], [], [], None)

    def prepare_load(self, keys: list[Key], *, promote: bool, prefetch: bool) -> LoadPlan:
        if not prefetch and keys:
            # Commonly every block is ready in ``cpu``: pin them in one manager
            # call, which pins nothing when one is not (then plan key by key).
            plan: LoadPlan = self._prepare_local_load(keys)
            if plan is not NOT_NOW:
                return plan
        cpu_keys: list[Key] = []
        cpu_pos: list[int] = []
        nvme_keys: list[Key] = []
        nvme_pos: list[int] = []
        for pos, key in enumerate(keys):
            tier = self._tier_of(key)
            if tier == CPU:
                if not prefetch:
                    cpu_keys.append(key)
                    cpu_pos.append(pos)
            elif tier == NVME:
                nvme_keys.append(key)
                nvme_pos.append(pos)
            elif not prefetch:
                raise BlockNotFoundError(f"load: block {key!r} is not available in any tier")
        cpu_ids = self.cpu.prepare_load(cpu_keys).block_ids if cpu_keys else []
        nvme = self._nvme()
        promote_keys: list[Key] = []
        promote_nvme: list[int] = []
        promote_cpu: list[int] = []
        promote_pos: list[int] = []
        direct_keys: list[Key] = []
        direct_nvme: list[int] = []
        direct_pos: list[int] = []
        demote = None
        if nvme_keys:
            assert nvme is not None
            nvme_ids = nvme.prepare_load(nvme_keys).block_ids
            slots: dict[Key, int] = {}
            if promote:
                out = self.cpu.prepare_store(nvme_keys)
                if out is not None:
                    slots = dict(zip(out.block_hashes_to_store, out.store_spec.block_ids))
                    demote = self._demote(out.block_hashes_evicted, out.block_ids_evicted)
            for key, nid, pos in zip(nvme_keys, nvme_ids, nvme_pos):
                cid = slots.get(key)
                if cid is not None:
                    promote_keys.append(key)
                    promote_nvme.append(nid)
                    promote_cpu.append(cid)
                    promote_pos.append(pos)
                elif prefetch:
                    # Nothing to do for this one: unpin it right away.
                    nvme.complete_load([key])
                else:
                    direct_keys.append(key)
                    direct_nvme.append(nid)
                    direct_pos.append(pos)
        return LoadPlan(
            cpu_keys,
            cpu_ids,
            cpu_pos,
            promote_keys,
            promote_nvme,
            promote_cpu,
            promote_pos,
            direct_keys,
            direct_nvme,
            direct_pos,
            demote,
        )

    def complete_load(self, plan: LoadPlan, promoted: bool, demoted: bool) -> None:
        self._complete_demotion(plan.demote, demoted)
        if plan.cpu_keys:
            self.cpu.complete_load(plan.cpu_keys)
        if plan.promote_keys:
            self.cpu.complete_store(plan.promote_keys, success=promoted)
            if promoted:
                self.promoted += len(plan.promote_keys)
                self.hub.publish(CacheEvent("promoted", CPU, list(plan.promote_keys)))
        nvme_keys = plan.promote_keys + plan.direct_keys
        if nvme_keys and self.nvme is not None:
            self.nvme.complete_load(nvme_keys)

    def drop(self, tier: str, keys: list[Key], *, corrupted: bool) -> list[Key]:
        manager = self._manager(tier)
        removed = manager.remove(keys)
        if corrupted and removed:
            self.corrupted += len(removed)
            self.hub.publish(CacheEvent("corrupted", tier, list(removed)))
        return removed

    def mark_failed(self, tier: str) -> None:
        self._manager(tier)
        self.failed.add(tier)

    def _manager(self, tier: str) -> OffloadingManager:
        if tier == CPU:
            return self.cpu
        if tier == NVME and self.nvme is not None:
            return self.nvme
        raise TierFailed(f"no tier named {tier!r}")

    def _flush_events(self) -> None:
        for manager in (self.cpu, self.nvme):
            if manager is None:
                continue
            for ev in manager.take_events():
                kind: EventKind = "removed" if ev.removed else "stored"
                self.hub.publish(CacheEvent(kind, ev.medium, ev.block_hashes))

    def snapshot(self) -> Snapshot:
        tiers = {CPU: self.cpu.stats()}
        if self.nvme is not None:
            tiers[NVME] = self.nvme.stats()
        return Snapshot(
            tiers=tiers,
            failed=sorted(self.failed),
            promoted=self.promoted,
            demoted=self.demoted,
            demotions_lost=self.demotions_lost,
            corrupted=self.corrupted,
            events_published=self.hub.published,
            events_dropped=self.hub.dropped,
        )
