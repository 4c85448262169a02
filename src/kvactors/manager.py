"""One tier's metadata: block pool, ref counts and events (vLLM ``OffloadingManager`` API).

The protocol, kept exactly as vLLM's ``v1/kv_offload`` defines it:

- ``lookup(keys) -> int``: how many leading keys are present **and ready**.
- ``prepare_store(keys)``: skips keys already present; when the free slots do not
  suffice, evicts idle blocks through the policy, never a key named in the call;
  returns ``None`` (nothing changed) when not enough idle blocks exist. New blocks
  enter at ref ``-1``: not readable, not evictable. One ``removed`` event lists the
  victims.
- ``complete_store(keys, success)``: success makes not-ready keys ready (one
  ``stored`` event); failure removes them and frees their slots. Ready keys are
  left alone.
- ``prepare_load(keys)`` pins each key (ref + 1) and returns the slot ids in key
  order; ``complete_load(keys)`` unpins.
- ``touch(keys)`` updates recency, walking the keys in reverse so the first key
  ends most recently used.

Slot ids: fresh ids ``0..N-1`` in order first, then freed ids, last freed first.
Everything here is synchronous and does no I/O; the policy actor wraps one
manager per tier, and a user's own scheduler may embed one directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import filterfalse

import msgspec

from kvactors.errors import (
    BlockNotFoundError,
    BlockNotPinnedError,
    BlockNotReadyError,
    BlockStateError,
    ConfigError,
    InvalidKeyError,
)
from kvactors.policy import make_policy
from kvactors.policy._base import BlockStatus, CachePolicy, Key

__all__ = [
    "LoadStoreSpec",
    "ManagerStats",
    "OffloadingEvent",
    "OffloadingManager",
    "PrepareStoreOutput",
]


class LoadStoreSpec(msgspec.Struct, frozen=True):
    """Where blocks live in one medium: one slot id per key, in key order."""

    block_ids: list[int]
    medium: str


class PrepareStoreOutput(msgspec.Struct, frozen=True):
    """What ``prepare_store`` decided.

    ``block_hashes_to_store`` are the keys the caller must now write, into
    ``store_spec.block_ids`` (same order). ``block_hashes_evicted`` left the tier
    to make room; ``block_ids_evicted`` are the slots they occupied (already
    handed out again in ``store_spec``), so a caller that demotes victims to a
    lower tier must copy them out before writing the new blocks.
    """

    block_hashes_to_store: list[Key]
    store_spec: LoadStoreSpec
    block_hashes_evicted: list[Key]
    block_ids_evicted: list[int] = []


class OffloadingEvent(msgspec.Struct, frozen=True):
    """Blocks that became ready (``removed=False``) or left the tier (``removed=True``)."""

    block_hashes: list[Key]
    block_size: int
    medium: str
    removed: bool


class ManagerStats(msgspec.Struct, frozen=True):
    """A snapshot of one tier's metadata. ``hits / lookup_keys`` is the key hit ratio."""

    medium: str
    policy: str
    capacity: int
    used: int
    free: int
    pinned: int
    being_written: int
    lookups: int
    lookup_keys: int
    hits: int
    stores: int
    evictions: int
    failed_prepares: int


_KEY_TYPES = frozenset((int, bytes))


def check_keys(keys: Sequence[Key], what: str = "") -> None:
    """Raise :class:`~kvactors.errors.InvalidKeyError` for a key that is not
    ``bytes``/``int`` or is named twice; ``what`` prefixes the message."""
    prefix = f"{what}: " if what else ""
    # The common case runs at C speed: one set of types, one set of keys.
    if not set(map(type, keys)) <= _KEY_TYPES:
        for key in keys:
            if type(key) is not int and type(key) is not bytes:
                kind = type(key).__name__
                raise InvalidKeyError(
                    f"{prefix}block key {key!r} has type {kind}; keys must be bytes or int"
                )
    if len(set(keys)) != len(keys):
        seen: set[Key] = set()
        for key in keys:
            if key in seen:
                raise InvalidKeyError(f"{prefix}block key {key!r} is named twice in one call")
            seen.add(key)


class OffloadingManager:
    """Metadata of one tier: ``num_blocks`` slots ordered by an eviction ``policy``.

    Drop-in for vLLM's ``OffloadingManager`` (same method names and semantics).
    ``policy`` is a name (``"lru"``, ``"arc"``, ``"weighted_lru"``) or a
    :class:`~kvactors.policy.CachePolicy` instance. ``block_size`` is reported
    in events only. Not thread-safe: one owner (an actor or a scheduler) calls it.

    Raises :class:`~kvactors.errors.ConfigError` for ``num_blocks <= 0`` and
    :class:`~kvactors.errors.UnknownPolicyError` for an unknown policy name.
    """

    def __init__(
        self,
        num_blocks: int,
        *,
        block_size: int,
        policy: str | CachePolicy = "lru",
        enable_events: bool = False,
        medium: str = "CPU",
    ) -> None:
        if type(num_blocks) is not int or num_blocks <= 0:
            raise ConfigError(f"num_blocks must be a positive int, got {num_blocks!r}")
        if type(block_size) is not int or block_size <= 0:
            raise ConfigError(f"block_size must be a positive int, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.medium = medium
        self._policy: CachePolicy = (
            make_policy(policy, num_blocks) if isinstance(policy, str) else policy
        )
        self._next_fresh = 0
        self._free_list: list[int] = []
        self._events: list[OffloadingEvent] | None = [] if enable_events else None
        self._lookups = 0
        self._lookup_keys = 0
        self._hits = 0
        self._stores = 0
        self._evictions = 0
        self._failed_prepares = 0

    # -- queries ----------------------------------------------------------------

    @property
    def policy(self) -> CachePolicy:
        return self._policy

    @property
    def num_free_blocks(self) -> int:
        return self.num_blocks - self._next_fresh + len(self._free_list)

    def __len__(self) -> int:
        return len(self._policy)

    def __contains__(self, key: object) -> bool:
        return key in self._policy

    def get(self, key: Key) -> BlockStatus | None:
        """The block record of ``key`` (``None`` when absent). Do not mutate it."""
        return self._policy.get(key)

    def lookup(self, keys: Iterable[Key]) -> int:
        """How many leading ``keys`` are present and ready. Changes no order."""
        keys = keys if isinstance(keys, Sequence) else list(keys)
        get = self._policy.get
        hits = 0
        for key in keys:
            block = get(key)
            if block is None or block.ref_cnt < 0:
                break
            hits += 1
        self._lookups += 1
        self._lookup_keys += len(keys)
        self._hits += hits
        return hits

    def touch(self, keys: Iterable[Key]) -> None:
        """Mark ``keys`` used, the first key most recently. Absent keys are ignored."""
        self._policy.touch(keys if isinstance(keys, Sequence) else list(keys))

    # -- store ------------------------------------------------------------------

    def prepare_store(self, keys: Iterable[Key]) -> PrepareStoreOutput | None:
        """Allocate slots for the keys not yet present, evicting idle blocks if needed.

        Returns ``None``, changing nothing, when not enough idle blocks (ref 0,
        not named in this call) can be evicted. New blocks are not ready until
        :meth:`complete_store`. Raises :class:`~kvactors.errors.InvalidKeyError`
        (nothing changed) for a key that is not ``bytes``/``int`` or named twice.
        """
        keys = keys if isinstance(keys, list) else list(keys)
        policy = self._policy
        # Keys not held (``get`` is None; a block record is always truthy), in C.
        to_store = list(filterfalse(policy.get, keys))
        if not to_store:
            return PrepareStoreOutput([], LoadStoreSpec([], self.medium), [])
        check_keys(to_store)
        free_list = self._free_list
        need = len(to_store) - (self.num_blocks - self._next_fresh + len(free_list))
        evicted: list[Key] = []
        evicted_ids: list[int] = []
        if need > 0:
            victims = policy.evict(need, set(keys))
            if victims is None:
                self._failed_prepares += 1
                return None
            for key, block in victims:
                evicted.append(key)
                evicted_ids.append(block.block_id)
            free_list.extend(evicted_ids)
            self._evictions += need
            if self._events is not None:
                self._events.append(OffloadingEvent(evicted, self.block_size, self.medium, True))
        # Fresh ids first, in order; then reuse freed ids, last freed first.
        n_fresh = min(len(to_store), self.num_blocks - self._next_fresh)
        ids = list(range(self._next_fresh, self._next_fresh + n_fresh))
        self._next_fresh += n_fresh
        n_reused = len(to_store) - n_fresh
        if n_reused:
            ids.extend(reversed(free_list[-n_reused:]))
            del free_list[-n_reused:]
        policy.insert_many(zip(to_store, map(BlockStatus, ids)))
        return PrepareStoreOutput(to_store, LoadStoreSpec(ids, self.medium), evicted, evicted_ids)

    def complete_store(self, keys: Iterable[Key], success: bool = True) -> None:
        """Finish a store: ready the not-ready ``keys`` or, on failure, drop them.

        Ready keys are left alone either way. Raises
        :class:`~kvactors.errors.BlockNotFoundError` (nothing changed) for an
        absent key.
        """
        keys = keys if isinstance(keys, list) else list(keys)
        get = self._policy.get
        blocks = [get(key) for key in keys]
        if None in blocks:
            missing = keys[blocks.index(None)]
            raise BlockNotFoundError(f"complete_store: block {missing!r} is not in {self.medium}")
        done: list[Key] = []
        if success:
            append = done.append
            for key, block in zip(keys, blocks):
                if block.ref_cnt < 0:  # type: ignore[union-attr]
                    block.ref_cnt = 0  # type: ignore[union-attr]
                    append(key)
            self._stores += len(done)
            if done and self._events is not None:
                self._events.append(OffloadingEvent(done, self.block_size, self.medium, False))
        else:
            remove = self._policy.remove
            for key, block in zip(keys, blocks):
                if block.ref_cnt < 0:  # type: ignore[union-attr]
                    remove(key)
                    self._free_list.append(block.block_id)  # type: ignore[union-attr]

    # -- load -------------------------------------------------------------------

    def prepare_load(self, keys: Iterable[Key]) -> LoadStoreSpec:
        """Pin every key (ref + 1) and return their slot ids in key order.

        Raises :class:`~kvactors.errors.BlockNotFoundError` or
        :class:`~kvactors.errors.BlockNotReadyError` naming the key; then no key
        is pinned.
        """
        get = self._policy.get
        ids: list[int] = []
        pinned: list[BlockStatus] = []
        for key in keys:
            block = get(key)
            if block is None or block.ref_cnt < 0:
                for undo in pinned:
                    undo.ref_cnt -= 1
                if block is None:
                    raise BlockNotFoundError(f"prepare_load: block {key!r} is not in {self.medium}")
                raise BlockNotReadyError(f"prepare_load: block {key!r} is still being written")
            block.ref_cnt += 1
            pinned.append(block)
            ids.append(block.block_id)
        return LoadStoreSpec(ids, self.medium)

    def complete_load(self, keys: Iterable[Key]) -> None:
        """Unpin every key (ref - 1).

        Raises :class:`~kvactors.errors.BlockNotFoundError` or
        :class:`~kvactors.errors.BlockNotPinnedError` naming the key; then no key
        is unpinned.
        """
        get = self._policy.get
        unpinned: list[BlockStatus] = []
        for key in keys:
            block = get(key)
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

    def restore(self, blocks: Iterable[tuple[Key, int]]) -> list[Key]:
        """Load ``(key, slot id)`` pairs found on disk into an empty manager, as ready.

        They enter in the given order (oldest first, for recency). Pairs with a
        bad key type, an out-of-range slot or a slot or key already restored
        are skipped; the keys restored are returned. Free slots are then handed
        out lowest first. Raises :class:`~kvactors.errors.BlockStateError` if the
        manager is not empty.
        """
        if len(self._policy) or self._next_fresh:
            raise BlockStateError(f"restore: the {self.medium} manager is not empty")
        used: set[int] = set()
        restored: list[Key] = []
        for key, block_id in blocks:
            if type(key) not in (int, bytes) or not 0 <= block_id < self.num_blocks:
                continue
            if block_id in used or key in self._policy:
                continue
            used.add(block_id)
            self._policy.insert(key, BlockStatus(block_id, ref_cnt=0))
            restored.append(key)
        self._next_fresh = self.num_blocks
        self._free_list = [i for i in range(self.num_blocks - 1, -1, -1) if i not in used]
        return restored

    # -- removal and events -----------------------------------------------------

    def remove(self, keys: Iterable[Key]) -> list[Key]:
        """Drop idle (ref 0) blocks among ``keys`` and free their slots.

        Absent, pinned and being-written keys are skipped. Returns the keys
        removed; one ``removed`` event lists them.
        """
        get = self._policy.get
        removed: list[Key] = []
        for key in keys:
            block = get(key)
            if block is not None and block.ref_cnt == 0:
                self._policy.remove(key)
                self._free_list.append(block.block_id)
                removed.append(key)
        if removed and self._events is not None:
            self._events.append(OffloadingEvent(removed, self.block_size, self.medium, True))
        return removed

    def take_events(self) -> list[OffloadingEvent]:
        """Return and clear the events gathered so far (always empty when events are off)."""
        if not self._events:
            return []
        events, self._events = self._events, []
        return events

    def stats(self) -> ManagerStats:
        pinned = 0
        writing = 0
        for key in self._iter_keys():
            block = self._policy.get(key)
            assert block is not None
            if block.ref_cnt > 0:
                pinned += 1
            elif block.ref_cnt < 0:
                writing += 1
        used = len(self._policy)
        return ManagerStats(
            medium=self.medium,
            policy=self._policy.name,
            capacity=self.num_blocks,
            used=used,
            free=self.num_free_blocks,
            pinned=pinned,
            being_written=writing,
            lookups=self._lookups,
            lookup_keys=self._lookup_keys,
            hits=self._hits,
            stores=self._stores,
            evictions=self._evictions,
            failed_prepares=self._failed_prepares,
        )

    def _iter_keys(self) -> list[Key]:
        return list(self._policy.keys())
