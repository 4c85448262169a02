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
from itertools import compress, count, filterfalse, takewhile

import msgspec

from kvactors.errors import (
    BlockNotFoundError,
    BlockNotPinnedError,
    BlockNotReadyError,
    BlockStateError,
    ConfigError,
    InvalidKeyError,
)
from kvactors.keys import Key
from kvactors.policy import make_policy
from kvactors.policy._base import BlockStatus, CachePolicy

try:
    from kvactors._manager_core import ManagerCore as _ManagerCore
    from kvactors._manager_core import first_bad_key as _first_bad_key
    from kvactors._manager_core import first_bad_slot as _first_bad_slot
except ImportError:  # built without a C compiler: the Python manager does it all
    _ManagerCore = None  # type: ignore[assignment,misc]
    _first_bad_key = None  # type: ignore[assignment]
    _first_bad_slot = None  # type: ignore[assignment]

__all__ = [
    "NATIVE",
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


NATIVE: bool = _ManagerCore is not None
"""Whether the compiled core was built (see :class:`OffloadingManager`'s ``native``)."""

_NATIVE_POLICIES = ("lru", "arc", "weighted_lru")

_KEY_TYPES = frozenset((int, bytes))
_INT_TYPE = frozenset((int,))


def check_keys(keys: Sequence[Key], what: str = "") -> None:
    """Raise :class:`~kvactors.errors.InvalidKeyError` for a key that is not
    ``bytes``/``int`` or is named twice; ``what`` prefixes the message."""
    if _first_bad_key is not None and _first_bad_key(keys) < 0:
        return  # the common case, in one C pass
    prefix = f"{what}: " if what else ""
    # Without the compiled check (or to name the bad key): one set of types,
    # one set of keys, both built in C; the loops run only to name the culprit.
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


def _use_native(policy: str | CachePolicy, native: bool | None) -> bool:
    """Whether a manager of ``policy`` runs on the compiled core."""
    if native is False:
        return False
    usable = _ManagerCore is not None and isinstance(policy, str) and policy in _NATIVE_POLICIES
    if native and not usable:
        why = (
            "the compiled core (kvactors._manager_core) is not built"
            if _ManagerCore is None
            else f"it implements the built-in policies by name only, not {policy!r}"
        )
        raise ConfigError(f"native=True: {why}")
    return usable


def distinct_slots(ids: object, limit: int) -> bool:
    """Whether ``ids`` is a non-empty ``list`` of distinct plain ints in ``0..limit-1``.

    A fast yes for the common case (one C pass when the core is built); a no
    says only that the caller must look closer (and name the error).
    """
    if type(ids) is not list or not ids:
        return False
    if _first_bad_slot is not None:
        return _first_bad_slot(ids, limit) < 0
    try:
        order = sorted(ids)
    except TypeError:
        return False
    return (
        order[0] >= 0
        and order[-1] < limit
        and set(map(type, ids)) <= _INT_TYPE
        and len(set(order)) == len(order)
    )


class OffloadingManager:
    """Metadata of one tier: ``num_blocks`` slots ordered by an eviction ``policy``.

    Drop-in for vLLM's ``OffloadingManager`` (same method names and semantics).
    ``policy`` is a name (``"lru"``, ``"arc"``, ``"weighted_lru"``) or a
    :class:`~kvactors.policy.CachePolicy` instance. ``block_size`` is reported
    in events only. Not thread-safe: one owner (an actor or a scheduler) calls it.

    ``native``: the built-in policies have a compiled core
    (``kvactors._manager_core``, built from ``native/manager_core.c`` at install
    time) with the same behaviour, several times faster. ``None`` (default)
    uses it when it is built and ``policy`` is a built-in name; ``False`` always
    uses the Python manager; ``True`` demands the compiled core
    (:class:`~kvactors.errors.ConfigError` if it is not built or ``policy`` is a
    :class:`~kvactors.policy.CachePolicy` object). On the compiled core
    :attr:`policy` is ``None`` and :meth:`get` returns a snapshot.

    Raises :class:`~kvactors.errors.ConfigError` for ``num_blocks <= 0`` and
    :class:`~kvactors.errors.UnknownPolicyError` for an unknown policy name.
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
        if cls is OffloadingManager and _use_native(policy, native):
            return object.__new__(_NativeManager)
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
        if type(num_blocks) is not int or num_blocks <= 0:
            raise ConfigError(f"num_blocks must be a positive int, got {num_blocks!r}")
        if type(block_size) is not int or block_size <= 0:
            raise ConfigError(f"block_size must be a positive int, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.medium = medium
        self._events: list[OffloadingEvent] | None = [] if enable_events else None
        self._init_state(policy)

    def _init_state(self, policy: str | CachePolicy) -> None:
        """The core's own state: here a policy object and Python containers."""
        self._policy: CachePolicy = (
            make_policy(policy, self.num_blocks) if isinstance(policy, str) else policy
        )
        # The policy's ``get`` (a bound C method for the built-in policies).
        self._get = self._policy.get
        self._next_fresh = 0
        self._free_list: list[int] = []
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

    # -- queries ----------------------------------------------------------------

    @property
    def policy(self) -> CachePolicy | None:
        """The eviction policy object; ``None`` on the compiled core."""
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
        return key in self._policy

    def get(self, key: Key) -> BlockStatus | None:
        """The block record of ``key`` (``None`` when absent). Do not mutate it."""
        return self._policy.get(key)

    def lookup(self, keys: Iterable[Key]) -> int:
        """How many leading ``keys`` are present and ready. Changes no order."""
        if type(keys) is not list and type(keys) is not tuple:
            keys = list(keys)
        # The leading present keys (a block record is always truthy), in C ...
        hits = len(list(takewhile(self._get, keys)))
        # ... cut at the first one still being written, if any is.
        writing = self._writing
        if writing and hits and not writing.isdisjoint(keys[:hits]):
            hits = next(compress(count(), map(writing.__contains__, keys[:hits])))
        self._lookups += 1
        self._lookup_keys += len(keys)
        self._hits += hits
        return hits

    def touch(self, keys: Iterable[Key]) -> None:
        """Mark ``keys`` used, the first key most recently. Absent keys are ignored."""
        self._policy.touch(keys if type(keys) is list or type(keys) is tuple else list(keys))

    # -- store ------------------------------------------------------------------

    def prepare_store(self, keys: Iterable[Key]) -> PrepareStoreOutput | None:
        """Allocate slots for the keys not yet present, evicting idle blocks if needed.

        Returns ``None``, changing nothing, when not enough idle blocks (ref 0,
        not named in this call) can be evicted. New blocks are not ready until
        :meth:`complete_store`. Raises :class:`~kvactors.errors.InvalidKeyError`
        (nothing changed) for a key that is not ``bytes``/``int`` or named twice.
        """
        keys = keys if type(keys) is list else list(keys)
        policy = self._policy
        # Keys not held (``get`` is None; a block record is always truthy), in C.
        to_store = list(filterfalse(self._get, keys))
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
            evicted = [key for key, _ in victims]
            evicted_ids = [block.block_id for _, block in victims]
            free_list.extend(evicted_ids)
            self._evictions += need
            self._event(evicted, True)
        # Fresh ids first, in order; then reuse freed ids, last freed first.
        n_fresh = min(len(to_store), self.num_blocks - self._next_fresh)
        ids = list(range(self._next_fresh, self._next_fresh + n_fresh))
        self._next_fresh += n_fresh
        n_reused = len(to_store) - n_fresh
        if n_reused:
            ids.extend(reversed(free_list[-n_reused:]))
            del free_list[-n_reused:]
        policy.insert_many(zip(to_store, map(BlockStatus, ids)))
        self._writing.update(to_store)
        return PrepareStoreOutput(to_store, LoadStoreSpec(ids, self.medium), evicted, evicted_ids)

    def complete_store(self, keys: Iterable[Key], success: bool = True) -> None:
        """Finish a store: ready the not-ready ``keys`` or, on failure, drop them.

        Ready keys are left alone either way. Raises
        :class:`~kvactors.errors.BlockNotFoundError` (nothing changed) for an
        absent key.
        """
        keys = keys if type(keys) is list else list(keys)
        blocks = list(map(self._get, keys))
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
            for block in map(get, pending):
                block.ref_cnt = 0  # type: ignore[union-attr]
            self._stores += len(pending)
            self._event(pending, False)
        else:
            remove = self._policy.remove
            free = self._free_list.append
            for key in pending:
                free(get(key).block_id)  # type: ignore[union-attr]
                remove(key)

    # -- load -------------------------------------------------------------------

    def prepare_load(self, keys: Iterable[Key]) -> LoadStoreSpec:
        """Pin every key (ref + 1) and return their slot ids in key order.

        Raises :class:`~kvactors.errors.BlockNotFoundError` or
        :class:`~kvactors.errors.BlockNotReadyError` naming the key; then no key
        is pinned.
        """
        get = self._get
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
        get = self._get
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


class _NativeManager(OffloadingManager):
    """A manager on the compiled core: the same contract, its state in C arrays.

    The core raises plain exceptions carrying the key (``KeyError``: absent,
    ``ValueError``: wrong state, ``TypeError``/``IndexError``: a bad new key);
    this class turns them into the typed errors the Python manager raises.
    """

    def _init_state(self, policy: str | CachePolicy) -> None:
        assert isinstance(policy, str)  # __new__ sends only built-in names here
        self._policy_name = policy
        self._core = core = _ManagerCore(self.num_blocks, policy)
        self._counters = core.counters  # type: ignore[method-assign]
        # The two calls a scheduler makes most go straight to C (same contract:
        # any iterable of keys; lookup counts hits; touch ignores absent keys).
        self.lookup = core.lookup  # type: ignore[method-assign,assignment]
        self.touch = core.touch  # type: ignore[method-assign,assignment]

    @property
    def policy(self) -> CachePolicy | None:
        return None

    @property
    def policy_name(self) -> str:
        return self._policy_name

    @property
    def native(self) -> bool:
        return True

    @property
    def num_free_blocks(self) -> int:
        return self._core.counters()[1]

    def __len__(self) -> int:
        return len(self._core)

    def __contains__(self, key: object) -> bool:
        return key in self._core

    def get(self, key: Key) -> BlockStatus | None:
        found = self._core.get(key)
        return None if found is None else BlockStatus(found[0], found[1])

    def prepare_store(self, keys: Iterable[Key]) -> PrepareStoreOutput | None:
        keys = keys if type(keys) is list else list(keys)
        try:
            out = self._core.prepare_store(keys)
        except (TypeError, IndexError):
            core = self._core
            check_keys([key for key in keys if key not in core])  # the typed error
            raise
        if out is None:
            return None
        to_store, ids, evicted, evicted_ids = out
        self._event(evicted, True)
        return PrepareStoreOutput(to_store, LoadStoreSpec(ids, self.medium), evicted, evicted_ids)

    def complete_store(self, keys: Iterable[Key], success: bool = True) -> None:
        try:
            done = self._core.complete_store(keys, success)
        except KeyError as exc:
            raise BlockNotFoundError(
                f"complete_store: block {exc.args[0]!r} is not in {self.medium}"
            ) from None
        if success:
            self._event(done, False)

    def prepare_load(self, keys: Iterable[Key]) -> LoadStoreSpec:
        try:
            return LoadStoreSpec(self._core.prepare_load(keys), self.medium)
        except KeyError as exc:
            raise BlockNotFoundError(
                f"prepare_load: block {exc.args[0]!r} is not in {self.medium}"
            ) from None
        except ValueError as exc:
            raise BlockNotReadyError(
                f"prepare_load: block {exc.args[0]!r} is still being written"
            ) from None

    def complete_load(self, keys: Iterable[Key]) -> None:
        try:
            self._core.complete_load(keys)
        except KeyError as exc:
            raise BlockNotFoundError(
                f"complete_load: block {exc.args[0]!r} is not in {self.medium}"
            ) from None
        except ValueError as exc:
            key = exc.args[0]
            raise BlockNotPinnedError(f"complete_load: block {key!r} is not pinned") from None

    def restore(self, blocks: Iterable[tuple[Key, int]]) -> list[Key]:
        if len(self._core) or self._core.counters()[1] != self.num_blocks:
            raise BlockStateError(f"restore: the {self.medium} manager is not empty")
        return self._core.restore((key, block_id) for key, block_id in blocks)

    def remove(self, keys: Iterable[Key]) -> list[Key]:
        removed = self._core.remove(keys)
        self._event(removed, True)
        return removed
