"""The Python manager: the executable reference of the one state machine.

The compiled core (native/manager_core.c) implements exactly this, call for
call; ``tests/test_native_core.py`` drives both side by side and compares every
answer, error, event, statistic and the policies' order data. Restoring from
disk is in :mod:`kvactors.manager._restore`, the checks of keys and of a
policy's answers in :mod:`kvactors.manager._contract`.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import compress, count, takewhile
from typing import Any

from kvactors.errors import BlockNotFoundError, BlockNotPinnedError, BlockNotReadyError
from kvactors.keys import Key
from kvactors.manager._checks import check_sizes, resolve_policy, use_native
from kvactors.manager._contract import (
    admitted_keys,
    check_new_keys,
    check_usable,
    check_victims,
    is_none,
    key_fault,
    key_tuple,
)
from kvactors.manager._restore import Restore
from kvactors.manager._types import (
    LoadStoreSpec,
    ManagerStats,
    OffloadingEvent,
    PrepareStoreOutput,
)
from kvactors.policy import make_policy
from kvactors.policy._base import BlockStatus, CachePolicy

__all__ = ["OffloadingManager"]


class OffloadingManager(Restore):
    """Metadata of one tier: ``num_blocks`` slots ordered by an eviction ``policy``.

    Drop-in for vLLM's ``OffloadingManager`` (same method names and semantics).
    ``policy`` is a name (``"lru"``, ``"arc"``, ``"weighted_lru"``) or a
    :class:`~kvactors.policy.CachePolicy` object. ``block_size`` (tokens per
    block) is reported in events and is every block's size for size-aware
    policies (``BlockStatus.size``). Not thread-safe: one owner (an actor or a
    scheduler) calls it.

    ``native``: every manager runs on one state machine, compiled
    (``kvactors._manager_core``, built from ``native/`` at install time) or this
    Python reference. ``None`` (default) uses the compiled core when it is
    built, for any policy: the built-in ones have C table entries, a
    ``CachePolicy`` object is called back from C. ``False`` always uses the
    Python manager; ``True`` demands the compiled core
    (:class:`~kvactors.errors.ConfigError` if it is not built). On the compiled
    core with a built-in policy :attr:`policy` is ``None``; :meth:`get` returns
    a snapshot there.

    Raises :class:`~kvactors.errors.ConfigError` naming the field for
    ``num_blocks`` outside ``1..2**31-1`` or a bad ``block_size``, and
    :class:`~kvactors.errors.UnknownPolicyError` for an unknown policy name or
    a ``policy`` that is neither a name nor a ``CachePolicy``.
    """

    def __new__(
        cls,
        num_blocks: int,
        *,
        block_size: int,
        policy: str | CachePolicy = "lru",
        enable_events: bool = False,
        medium: str = "CPU",
        native: bool | None = None,
    ) -> OffloadingManager:
        if cls is OffloadingManager and use_native(native):
            from kvactors.manager._native import NativeManager

            return object.__new__(NativeManager)
        return object.__new__(cls)

    def __init__(
        self,
        num_blocks: int,
        *,
        block_size: int,
        policy: str | CachePolicy = "lru",
        enable_events: bool = False,
        medium: str = "CPU",
        native: bool | None = None,
    ) -> None:
        check_sizes(num_blocks, block_size, medium)
        resolved = resolve_policy(policy)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.medium = medium
        self._events: list[OffloadingEvent] | None = [] if enable_events else None
        self._init_state(resolved)

    def _init_state(self, policy: str | CachePolicy) -> None:
        """The core's own state: here a policy object and Python containers."""
        self._policy: CachePolicy = (
            make_policy(policy, self.num_blocks) if isinstance(policy, str) else policy
        )
        # The policy's ``get`` (a bound C method for the built-in policies).
        self._get = self._policy.get
        # Optional admission hook: ``admit(keys, new_keys) -> the leading new keys to store``.
        self._admit = getattr(self._policy, "admit", None)
        self._next_fresh = 0  # ids _next_fresh..num_blocks-1 never handed out
        self._free_list: list[int] = []  # freed ids, last freed on top
        self._stack_first = False  # after restore: the free list before fresh ids
        # Keys at ref -1 (prepared, not completed): an index of the blocks'
        # ``ref_cnt == -1`` so lookups and completions test membership in C.
        self._writing: set[Key] = set()
        self._lookups = 0
        self._lookup_keys = 0
        self._hits = 0
        self._stores = 0
        self._evictions = 0
        self._failed_prepares = 0

    def _event(self, keys: list[Key], removed: bool) -> None:
        if self._events is not None and keys:
            self._events.append(OffloadingEvent(keys, self.block_size, self.medium, removed))

    def _blocks(self, method: str, keys: tuple[Any, ...]) -> list[BlockStatus | None]:
        """Every key's block (``None``: absent); a key whose lookup raises is the
        call's error, before anything changes."""
        try:
            return list(map(self._get, keys))
        except Exception:
            check_usable(self._get, method, keys)
            raise

    # -- queries ----------------------------------------------------------------

    @property
    def policy(self) -> CachePolicy | None:
        """The eviction policy object; ``None`` for a built-in on the compiled core."""
        return self._policy

    @property
    def policy_name(self) -> str:
        return self._policy.name

    @property
    def native(self) -> bool:
        """Whether this manager runs on the compiled core."""
        return False

    @property
    def num_free_blocks(self) -> int:
        return self.num_blocks - self._next_fresh + len(self._free_list)

    def __len__(self) -> int:
        return len(self._policy)

    def __contains__(self, key: object) -> bool:
        try:
            return self._policy.get(key) is not None  # type: ignore[arg-type]
        except Exception as exc:
            key_fault("__contains__", key, exc)

    def get(self, key: Key) -> BlockStatus | None:
        """The block record of ``key`` (``None`` when absent). Do not mutate it."""
        try:
            return self._policy.get(key)
        except Exception as exc:
            key_fault("get", key, exc)

    def lookup(self, keys: Iterable[Key]) -> int:
        """How many leading ``keys`` are present and ready. Changes no order."""
        keys = key_tuple("lookup", keys)
        try:
            # The leading present keys (a block record is always truthy), in C ...
            hits = len(list(takewhile(self._get, keys)))
        except Exception:
            check_usable(self._get, "lookup", keys)
            raise
        # ... cut at the first one still being written, if any is.
        writing = self._writing
        if writing and hits and not writing.isdisjoint(keys[:hits]):
            hits = next(compress(count(), map(writing.__contains__, keys[:hits])))
        check_usable(self._get, "lookup", keys[hits:])
        self._lookups += 1
        self._lookup_keys += len(keys)
        self._hits += hits
        return hits

    def touch(self, keys: Iterable[Key]) -> None:
        """Mark ``keys`` used, the first key most recently. Absent keys are ignored."""
        keys = list(key_tuple("touch", keys))
        check_usable(self._get, "touch", keys)
        self._policy.touch(keys)

    # -- store ------------------------------------------------------------------

    def prepare_store(self, keys: Iterable[Key]) -> PrepareStoreOutput | None:
        """Allocate slots for the keys not yet present, evicting idle blocks if needed.

        Returns ``None``, changing nothing, when not enough idle blocks (ref 0,
        not named in this call) can be evicted. New blocks are not ready until
        :meth:`complete_store`. Raises :class:`~kvactors.errors.InvalidKeyError`
        (nothing changed) for a key that cannot be looked up, a new key that is
        not ``bytes``/``int``, or a new key named twice.
        """
        keys = key_tuple("prepare_store", keys)
        blocks = self._blocks("prepare_store", keys)
        to_store = list(compress(keys, map(is_none, blocks)))
        if not to_store:
            return PrepareStoreOutput([], LoadStoreSpec([], self.medium), [])
        check_new_keys(to_store)
        if self._admit is not None:
            # An admission policy may decline new keys: a leading part is stored.
            to_store = admitted_keys(
                self._policy, self._admit(list(keys), list(to_store)), to_store
            )
            if not to_store:
                return PrepareStoreOutput([], LoadStoreSpec([], self.medium), [])
        free_list = self._free_list
        need = len(to_store) - self.num_free_blocks
        evicted: list[Key] = []
        evicted_ids: list[int] = []
        if need > 0:
            victims = self._policy.evict(need, set(keys))
            if victims is None:
                self._failed_prepares += 1
                return None
            check_victims(self._policy, self.num_blocks, need, victims, keys)
            evicted = [key for key, _ in victims]
            evicted_ids = [block.block_id for _, block in victims]
            free_list.extend(evicted_ids)
            self._evictions += need
            self._event(evicted, True)
        ids = self._take(len(to_store))
        size = self.block_size
        self._policy.insert_many([(k, BlockStatus(i, -1, size)) for k, i in zip(to_store, ids)])
        self._writing.update(to_store)
        return PrepareStoreOutput(to_store, LoadStoreSpec(ids, self.medium), evicted, evicted_ids)

    def _take(self, n: int) -> list[int]:
        """``n`` slot ids: fresh ids in order first, then freed ids, last freed
        first (after :meth:`restore`: freed ids first, then fresh ones)."""
        free_list = self._free_list
        fresh_left = self.num_blocks - self._next_fresh
        n_fresh = max(0, n - len(free_list)) if self._stack_first else min(n, fresh_left)
        fresh = list(range(self._next_fresh, self._next_fresh + n_fresh))
        self._next_fresh += n_fresh
        n_reused = n - n_fresh
        reused = list(reversed(free_list[-n_reused:])) if n_reused else []
        if n_reused:
            del free_list[-n_reused:]
        return reused + fresh if self._stack_first else fresh + reused

    def complete_store(self, keys: Iterable[Key], success: bool = True) -> None:
        """Finish a store: ready the not-ready ``keys`` or, on failure, drop them.

        Ready keys are left alone either way. Raises
        :class:`~kvactors.errors.BlockNotFoundError` (nothing changed) for an
        absent key.
        """
        keys = key_tuple("complete_store", keys)
        blocks = self._blocks("complete_store", keys)
        if None in blocks:
            missing = keys[blocks.index(None)]
            raise BlockNotFoundError(f"complete_store: block {missing!r} is not in {self.medium}")
        writing = self._writing
        # The keys still at ref -1, in call order (C pipeline).
        pending = list(filter(writing.__contains__, keys))
        if not pending:
            return
        before = len(writing)
        writing.difference_update(pending)
        if before - len(writing) != len(pending):  # a key named twice: complete it once
            pending = list(dict.fromkeys(pending))
        get = self._get
        if success:
            self._stores += len(pending)
            for block in map(get, pending):
                block.ref_cnt = 0  # type: ignore[union-attr]
            self._event(pending, False)
        else:
            remove = self._policy.remove
            free = self._free_list.append
            for key in pending:
                block_id = get(key).block_id  # type: ignore[union-attr]
                remove(key)
                free(block_id)

    # -- load -------------------------------------------------------------------

    def prepare_load(self, keys: Iterable[Key]) -> LoadStoreSpec:
        """Pin every key (ref + 1) and return their slot ids in key order.

        Raises :class:`~kvactors.errors.InvalidKeyError` for a key that cannot
        be looked up, then :class:`~kvactors.errors.BlockNotFoundError` or
        :class:`~kvactors.errors.BlockNotReadyError` naming the first key in
        that state; then no key is pinned.
        """
        keys = key_tuple("prepare_load", keys)
        blocks = self._blocks("prepare_load", keys)
        for key, block in zip(keys, blocks):
            if block is None:
                raise BlockNotFoundError(f"prepare_load: block {key!r} is not in {self.medium}")
            if block.ref_cnt < 0:
                raise BlockNotReadyError(f"prepare_load: block {key!r} is still being written")
        for block in blocks:
            block.ref_cnt += 1  # type: ignore[union-attr]
        return LoadStoreSpec([block.block_id for block in blocks], self.medium)  # type: ignore[union-attr]

    def complete_load(self, keys: Iterable[Key]) -> None:
        """Unpin every key (ref - 1).

        Raises :class:`~kvactors.errors.InvalidKeyError`,
        :class:`~kvactors.errors.BlockNotFoundError` or
        :class:`~kvactors.errors.BlockNotPinnedError` naming the key; then no key
        is unpinned (a key named twice but pinned once fails on its second unpin).
        """
        keys = key_tuple("complete_load", keys)
        blocks = self._blocks("complete_load", keys)
        unpinned: list[BlockStatus] = []
        for key, block in zip(keys, blocks):
            if block is None or block.ref_cnt <= 0:
                for undo in unpinned:
                    undo.ref_cnt += 1
                if block is None:
                    raise BlockNotFoundError(
                        f"complete_load: block {key!r} is not in {self.medium}"
                    )
                raise BlockNotPinnedError(f"complete_load: block {key!r} is not pinned")
            block.ref_cnt -= 1
            unpinned.append(block)

    # -- removal and events -----------------------------------------------------

    def remove(self, keys: Iterable[Key]) -> list[Key]:
        """Drop idle (ref 0) blocks among ``keys`` and free their slots.

        Absent, pinned and being-written keys are skipped (a key that cannot
        be looked up raises :class:`~kvactors.errors.InvalidKeyError`, nothing
        removed). Returns the keys removed; one ``removed`` event lists them.
        """
        keys = key_tuple("remove", keys)
        self._blocks("remove", keys)
        get = self._get
        removed: list[Key] = []
        for key in keys:
            block = get(key)
            if block is not None and block.ref_cnt == 0:
                self._policy.remove(key)
                self._free_list.append(block.block_id)
                removed.append(key)
        self._event(removed, True)
        return removed

    def take_events(self) -> list[OffloadingEvent]:
        """Return and clear the events gathered so far (always empty when events are off)."""
        if not self._events:
            return []
        events, self._events = self._events, []
        return events

    def stats(self) -> ManagerStats:
        used, free, pinned, writing, lookups, lookup_keys, hits, stores, evictions, failed = (
            self._counters()
        )
        return ManagerStats(
            medium=self.medium,
            policy=self.policy_name,
            capacity=self.num_blocks,
            used=used,
            free=free,
            pinned=pinned,
            being_written=writing,
            lookups=lookups,
            lookup_keys=lookup_keys,
            hits=hits,
            stores=stores,
            evictions=evictions,
            failed_prepares=failed,
        )

    def _counters(self) -> tuple[int, int, int, int, int, int, int, int, int, int]:
        """(used, free, pinned, writing, lookups, lookup_keys, hits, stores, evictions,
        failed_prepares), the order the compiled core reports them in."""
        get = self._get
        pinned = 0
        for key in self._policy.keys():  # noqa: SIM118 (a CachePolicy promises keys(), not iter)
            block = get(key)
            if block is not None and block.ref_cnt > 0:
                pinned += 1
        return (
            len(self._policy),
            self.num_free_blocks,
            pinned,
            len(self._writing),
            self._lookups,
            self._lookup_keys,
            self._hits,
            self._stores,
            self._evictions,
            self._failed_prepares,
        )
