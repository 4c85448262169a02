"""The scheduler side of the vLLM backend, without vLLM: two kvactors managers
(CPU, and NVMe when configured) and the plans the worker carries out.

Only metadata lives here: slot ids, reference counts, eviction order. Every
byte move is a :class:`TransferPlan` inside the load/store spec vLLM hands to
the worker process, which executes plans in the order they were made.

- **Loads** read CPU hits from their CPU slot. NVMe hits are *promoted*: they
  get a CPU slot (evicting idle CPU blocks, which are demoted) and the worker
  reads the file slot into it before scattering into the paged KV cache; when
  no CPU slot is free, the worker reads into scratch rows instead.
- **Stores** write into CPU slots. CPU victims are *demoted* to NVMe
  (``write_mode="back"``) unless NVMe already holds them; with
  ``write_mode="through"`` every stored block is also written to NVMe.
- A plan's NVMe writes become readable, and its promotions loadable from CPU,
  when vLLM completes the job that carried it.
- **Recency**: vLLM 0.32 never calls ``touch``; :meth:`TieredManager.finish`
  (from ``on_request_finished``) marks the blocks a request used (loaded, or
  offered for storing while held) used, prefix first; blocks it stored are
  not uses (an admission policy such as ``prefix_admit`` learns from that).
"""

from __future__ import annotations

import dataclasses
from collections import deque

from kvactors.keys import Key
from kvactors.manager import OffloadingManager

__all__ = ["CPU", "NVME", "Moves", "PrefetchPlan", "TieredManager", "TransferPlan"]

CPU = "cpu"
NVME = "nvme"


@dataclasses.dataclass
class Moves:
    """Blocks moved between the CPU pool and the NVMe store, in the worker."""

    cpu_slots: list[int] = dataclasses.field(default_factory=list)
    nvme_slots: list[int] = dataclasses.field(default_factory=list)
    keys: list[Key] = dataclasses.field(default_factory=list)

    def add(self, cpu_slot: int, nvme_slot: int, key: Key) -> None:
        self.cpu_slots.append(cpu_slot)
        self.nvme_slots.append(nvme_slot)
        self.keys.append(key)

    def __len__(self) -> int:
        return len(self.keys)


@dataclasses.dataclass
class TransferPlan:
    """What the worker does for one job, in this order.

    1. ``demote``: CPU slot -> NVMe slot (victims whose CPU slot this job reuses).
    2. loads: ``promote``: NVMe slot -> CPU slot (``-1``: a scratch row), verified
       against the key's checksum; its ``cpu_slots`` are positions in the job.
    3. the paged KV cache <-> ``cpu_slots`` (one per key of the job, key order;
       ``-1``: the scratch row of that key's promotion).
    4. stores: ``write_through``: CPU slot -> NVMe slot; ``remote_put``: CPU slot
       -> the remote store (its ``nvme_slots`` unused).
    """

    cpu_slots: list[int]
    demote: Moves = dataclasses.field(default_factory=Moves)
    promote: Moves = dataclasses.field(default_factory=Moves)
    write_through: Moves = dataclasses.field(default_factory=Moves)
    remote_put: Moves = dataclasses.field(default_factory=Moves)


@dataclasses.dataclass
class PrefetchPlan:
    """One prefetch: ``demote`` (the victim of the CPU slot), then NVMe slot
    ``nvme_slot`` (``-1``: the remote store) -> CPU slot ``cpu_slot``."""

    cpu_slot: int
    nvme_slot: int
    demote: Moves


@dataclasses.dataclass
class _LoadRecord:
    cpu_keys: list[Key]
    nvme_keys: list[Key]
    promoted: list[Key]
    nvme_written: list[Key]


@dataclasses.dataclass
class _StoreRecord:
    stored: list[Key]
    nvme_written: list[Key]


COUNTERS = (
    "cpu_load_blocks",
    "nvme_load_blocks",
    "store_blocks",
    "promoted_blocks",
    "demoted_blocks",
    "write_through_blocks",
    "dropped_blocks",
    "failed_stores",
    "prefetched_blocks",
    "prefetch_failures",
    "remote_store_blocks",
    "remote_fetched_blocks",
    "remote_fetch_failures",
)


class TieredManager:
    """CPU (and NVMe) tier metadata for one vLLM scheduler.

    ``cpu_blocks`` / ``nvme_blocks`` are slot counts (``nvme_blocks=0``: no NVMe
    tier). Keys are vLLM's ``OffloadKey`` bytes.
    """

    def __init__(
        self,
        cpu_blocks: int,
        nvme_blocks: int = 0,
        *,
        policy: str = "lru",
        nvme_policy: str | None = None,
        write_mode: str = "back",
        block_size: int = 16,
        enable_events: bool = False,
        remote: bool = False,
    ) -> None:
        self._args = (cpu_blocks, nvme_blocks, policy, nvme_policy or policy, block_size)
        self.write_mode = write_mode
        self.remote = remote
        self.enable_events = enable_events
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._build()

    def _build(self) -> None:
        cpu_blocks, nvme_blocks, policy, nvme_policy, block_size = self._args
        events = self.enable_events
        self.cpu = OffloadingManager(
            cpu_blocks, block_size=block_size, policy=policy, enable_events=events, medium="CPU"
        )
        self.nvme = (
            OffloadingManager(
                nvme_blocks,
                block_size=block_size,
                policy=nvme_policy,
                enable_events=events,
                medium="NVMe",
            )
            if nvme_blocks > 0
            else None
        )
        self._loads: dict[frozenset[Key], deque[_LoadRecord]] = {}
        self._stores: dict[frozenset[Key], deque[_StoreRecord]] = {}
        self._prefetching: dict[Key, bool] = {}  # key -> read from NVMe (else remote)

    # -- lookups -------------------------------------------------------------------

    def lookup(self, key: Key) -> str:
        """``"hit"`` (ready in a tier), ``"pending"`` (being written or prefetched) or
        ``"miss"``."""
        if key in self._prefetching:
            return "pending"
        state = self.cpu.get(key)
        if state is not None and state.ref_cnt >= 0:
            return "hit"
        if self.nvme is not None:
            nstate = self.nvme.get(key)
            if nstate is not None:
                return "hit" if nstate.ref_cnt >= 0 else "pending"
        return "miss" if state is None else "pending"

    def holds(self, key: Key) -> bool:
        """Whether a tier holds ``key`` (readable or being written)."""
        return key in self.cpu or (self.nvme is not None and key in self.nvme)

    def source(self, key: Key) -> str | None:
        """The tier a load of ``key`` reads: :data:`CPU`, :data:`NVME` or ``None``."""
        state = self.cpu.get(key)
        if state is not None and state.ref_cnt >= 0:
            return CPU
        if self.nvme is not None and key in self.nvme:
            return NVME
        return CPU if state is not None else None

    # -- prefetch ------------------------------------------------------------------

    def start_prefetch(self, key: Key, from_remote: bool = False) -> PrefetchPlan | None:
        """Reserve a CPU slot for ``key`` (absent from CPU; ready in NVMe, whose copy
        is pinned, or ``from_remote``: in no local tier, read from the remote store);
        ``None`` when there is nothing to read or no CPU slot to take (the CPU policy
        may also decline it). Until :meth:`complete_prefetch`, lookups of ``key``
        answer ``"pending"``."""
        if key in self.cpu or key in self._prefetching:
            return None
        nvme_slot = -1
        if from_remote:
            if not self.remote or (self.nvme is not None and key in self.nvme):
                return None
        else:
            nstate = self.nvme.get(key) if self.nvme is not None else None
            if nstate is None or nstate.ref_cnt < 0:
                return None
            assert self.nvme is not None
            nvme_slot = self.nvme.prepare_load([key]).block_ids[0]  # pinned before demotions
        out = self.cpu.prepare_store([key])
        if out is None or not out.block_hashes_to_store:
            if self.nvme is not None and nvme_slot >= 0:
                self.nvme.complete_load([key])
            return None
        demote = Moves()
        self._demote(demote, list(out.block_hashes_evicted), list(out.block_ids_evicted))
        self._prefetching[key] = not from_remote
        return PrefetchPlan(int(out.store_spec.block_ids[0]), int(nvme_slot), demote)

    def complete_prefetch(self, key: Key, success: bool) -> None:
        """The prefetch of ``key`` ended: its CPU copy is readable, or (``success``
        false: the read failed, missed, or the bytes failed their checksum) it and
        the NVMe copy are forgotten."""
        if key not in self._prefetching:
            return
        from_nvme = self._prefetching.pop(key)
        self.cpu.complete_store([key], success)
        if not from_nvme:
            name = "remote_fetched_blocks" if success else "remote_fetch_failures"
            self.counters[name] += 1
            return
        assert self.nvme is not None
        self.nvme.complete_load([key])
        if success:
            self.counters["prefetched_blocks"] += 1
        else:
            self.counters["prefetch_failures"] += 1
            self.nvme.remove([key])

    def complete_demotion(self, key: Key, success: bool) -> None:
        """A prefetch's victim ``key`` was written to NVMe (or failed to be)."""
        self._complete_nvme([key], success)

    # -- loads ---------------------------------------------------------------------

    def prepare_load(self, keys: list[Key]) -> TransferPlan:
        """Pin ``keys`` (all hits) and plan their load; NVMe hits are promoted."""
        cpu_keys: list[Key] = []
        nvme_keys: list[Key] = []
        for key in keys:
            state = self.cpu.get(key)
            if state is not None and state.ref_cnt >= 0:
                cpu_keys.append(key)
            else:
                nvme_keys.append(key)
        if nvme_keys and self.nvme is None:
            raise KeyError(f"prepare_load: key {nvme_keys[0]!r} is in no tier")
        slot_of: dict[Key, int] = {}
        if cpu_keys:
            slot_of.update(zip(cpu_keys, self.cpu.prepare_load(cpu_keys).block_ids))
        plan = TransferPlan(cpu_slots=[])
        promoted: list[Key] = []
        written: list[Key] = []
        if nvme_keys:
            assert self.nvme is not None
            nvme_slots = self.nvme.prepare_load(nvme_keys).block_ids
            # Promotion: CPU slots for the NVMe hits, unless a store is already
            # writing the key into CPU (then it is read into a scratch row).
            fresh = [k for k in nvme_keys if k not in self.cpu]
            out = self.cpu.prepare_store(fresh) if fresh else None
            if out is not None:
                promoted = list(out.block_hashes_to_store)
                slot_of.update(zip(promoted, out.store_spec.block_ids))
                written = self._demote(
                    plan.demote, list(out.block_hashes_evicted), list(out.block_ids_evicted)
                )
            positions = {key: i for i, key in enumerate(keys)}
            for key, nslot in zip(nvme_keys, nvme_slots):
                plan.promote.add(positions[key], nslot, key)
            self.counters["promoted_blocks"] += len(promoted)
        plan.cpu_slots = [slot_of.get(key, -1) for key in keys]
        self.counters["cpu_load_blocks"] += len(cpu_keys)
        self.counters["nvme_load_blocks"] += len(nvme_keys)
        record = _LoadRecord(cpu_keys, nvme_keys, promoted, written)
        self._loads.setdefault(frozenset(keys), deque()).append(record)
        return plan

    def complete_load(self, keys: list[Key] | set[Key] | frozenset[Key]) -> None:
        """The load of ``keys`` ended: unpin, and make its promotions and demotions readable."""
        queue = self._loads.get(frozenset(keys))
        if not queue:
            return
        record = queue.popleft()
        if not queue:
            del self._loads[frozenset(keys)]
        if record.cpu_keys:
            self.cpu.complete_load(record.cpu_keys)
        if record.promoted:
            self.cpu.complete_store(record.promoted)
        if self.nvme is not None:
            if record.nvme_keys:
                self.nvme.complete_load(record.nvme_keys)
            if record.nvme_written:
                self.nvme.complete_store(record.nvme_written)

    # -- stores --------------------------------------------------------------------

    def prepare_store(self, keys: list[Key]) -> tuple[list[Key], TransferPlan] | None:
        """Slots for the keys the CPU tier lacks, in ``keys`` order; ``None``: no room."""
        out = self.cpu.prepare_store(keys)
        if out is None:
            self.counters["failed_stores"] += 1
            return None
        to_store = list(out.block_hashes_to_store)
        slots = list(out.store_spec.block_ids)
        plan = TransferPlan(cpu_slots=slots)
        written = self._demote(
            plan.demote, list(out.block_hashes_evicted), list(out.block_ids_evicted)
        )
        if self.write_mode == "through" and self.nvme is not None and to_store:
            slot_of = dict(zip(to_store, slots))
            new = [k for k in to_store if k not in self.nvme]
            nout = self.nvme.prepare_store(new) if new else None
            if nout is not None:
                for key, nslot in zip(nout.block_hashes_to_store, nout.store_spec.block_ids):
                    plan.write_through.add(slot_of[key], nslot, key)
                written += list(nout.block_hashes_to_store)
                self.counters["write_through_blocks"] += len(nout.block_hashes_to_store)
        if self.remote and to_store:
            for key, slot in zip(to_store, slots):
                plan.remote_put.add(slot, -1, key)
            self.counters["remote_store_blocks"] += len(to_store)
        self.counters["store_blocks"] += len(to_store)
        if to_store:
            record = _StoreRecord(to_store, written)
            self._stores.setdefault(frozenset(to_store), deque()).append(record)
        elif written:  # victims demoted by a store that stores nothing: cannot happen
            self._complete_nvme(written, True)
        return to_store, plan

    def complete_store(
        self, keys: list[Key] | set[Key] | frozenset[Key], success: bool = True
    ) -> None:
        queue = self._stores.get(frozenset(keys))
        if not queue:
            self.cpu.complete_store(list(keys), success)
            return
        record = queue.popleft()
        if not queue:
            del self._stores[frozenset(keys)]
        self.cpu.complete_store(record.stored, success)
        self._complete_nvme(record.nvme_written, success)

    def _complete_nvme(self, keys: list[Key], success: bool) -> None:
        if self.nvme is not None and keys:
            self.nvme.complete_store(keys, success)

    def _demote(self, moves: Moves, victims: list[Key], slots: list[int]) -> list[Key]:
        """Plan CPU victims' moves to NVMe; returns the keys NVMe is now writing."""
        if not victims:
            return []
        if self.nvme is None or self.write_mode == "through":
            # Without NVMe they are gone; write-through already put them there.
            if self.nvme is None:
                self.counters["dropped_blocks"] += len(victims)
            else:
                self.counters["dropped_blocks"] += sum(1 for k in victims if k not in self.nvme)
            return []
        slot_of = dict(zip(victims, slots))
        new = [k for k in victims if k not in self.nvme]
        if not new:
            return []
        out = self.nvme.prepare_store(new)
        if out is None:
            self.counters["dropped_blocks"] += len(new)
            return []
        for key, nslot in zip(out.block_hashes_to_store, out.store_spec.block_ids):
            moves.add(slot_of[key], nslot, key)
        self.counters["demoted_blocks"] += len(out.block_hashes_to_store)
        return list(out.block_hashes_to_store)

    # -- recency, events, stats -------------------------------------------------------

    def finish(self, keys: list[Key]) -> None:
        """A request that used ``keys`` (prefix order) finished: they become the most
        recent blocks of each tier holding them, the first key most recent."""
        if not keys:
            return
        self.cpu.touch(keys)
        if self.nvme is not None:
            self.nvme.touch(keys)

    def take_events(self) -> list[tuple[list[Key], str, bool]]:
        """``(keys, tier, removed)`` since the last call (empty without events)."""
        out: list[tuple[list[Key], str, bool]] = []
        for tier, mgr in ((CPU, self.cpu), (NVME, self.nvme)):
            if mgr is None:
                continue
            for event in mgr.take_events():
                keys = list(event.block_hashes)
                out.append((keys, tier, event.removed))
        return out

    def take_counters(self) -> dict[str, int]:
        """The counters since the last call."""
        out, self.counters = self.counters, dict.fromkeys(COUNTERS, 0)
        return out

    def usage(self) -> dict[str, float]:
        """Fraction of each tier's slots in use."""
        out: dict[str, float] = {}
        for tier, mgr in ((CPU, self.cpu), (NVME, self.nvme)):
            if mgr is not None:
                stats = mgr.stats()
                out[tier] = stats.used / stats.capacity if stats.capacity else 0.0
        return out

    @property
    def prefetching(self) -> int:
        """Prefetches started and not yet completed."""
        return len(self._prefetching)

    def reset(self) -> None:
        """Forget every block (vLLM's ``reset_cache``); counters are kept."""
        self._build()
