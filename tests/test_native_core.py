"""The compiled manager core (native/) against the Python reference manager.

The scenario tests and the state machine already run both cores against the
same expectations; here random operation sequences drive one manager of each
core side by side and every answer, error, event, statistic and the policy's
order data must agree: for every policy of ``kvactors.policy.POLICIES`` (a
new one is picked up here by name), at several block sizes, and for a user's
own ``CachePolicy`` object, which the compiled core calls back.
"""

from __future__ import annotations

import random
import shutil
import sysconfig
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _policies import RecordingFIFO
from kvactors import OffloadingManager, manager
from kvactors.errors import (
    BlockNotPinnedError,
    BlockStateError,
    ConfigError,
    KVActorsError,
    PolicyError,
)
from kvactors.manager import _checks
from kvactors.media import file_store
from kvactors.media.nvme_index import NVMeIndex
from kvactors.policy import POLICIES, Key, LRUPolicy

WRITTEN, READY, PINNED = "written", "ready", "pinned"
needs_native = pytest.mark.skipif(not manager.NATIVE, reason="compiled core not built")
BLOCK_SIZES = [1, 16, 3]


def _compiler() -> str | None:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc)


@pytest.mark.skipif(_compiler() is None, reason="no C compiler to build the core with")
def test_core_is_built_where_a_compiler_exists() -> None:
    assert manager.NATIVE, "setup.py builds kvactors._manager_core; the build failed"
    assert file_store._io_vectored is not None, "setup.py builds kvactors._io_core; it failed"
    assert {"lru", "arc", "weighted_lru"} <= set(manager.NATIVE_POLICIES)
    mgr = OffloadingManager(4, block_size=16)
    assert mgr.native
    assert mgr.policy is None
    assert mgr.policy_name == "lru"


def test_native_choice_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    python = OffloadingManager(4, block_size=16, native=False)
    assert not python.native
    assert python.policy is not None
    with pytest.raises(ConfigError, match="native must be"):
        OffloadingManager(4, block_size=16, native="yes")  # type: ignore[arg-type]
    monkeypatch.setattr(_checks, "NATIVE", False)
    with pytest.raises(ConfigError, match="not built"):
        OffloadingManager(4, block_size=16, native=True)
    assert not OffloadingManager(4, block_size=16).native  # falls back quietly


@needs_native
def test_snapshot_and_unpin_of_a_key_named_twice() -> None:
    mgr = OffloadingManager(2, block_size=16, native=True)
    out = mgr.prepare_store([7])
    assert out is not None
    mgr.complete_store([7])
    mgr.prepare_load([7])
    block = mgr.get(7)
    assert block is not None
    assert (block.block_id, block.ref_cnt, block.size) == (0, 1, 16)
    with pytest.raises(BlockNotPinnedError, match="7"):
        mgr.complete_load([7, 7])  # pinned once: the second unpin fails, the first is undone
    assert mgr.stats().pinned == 1
    mgr.complete_load([7])
    assert mgr.stats().pinned == 0


class RecordingAdmitFIFO(RecordingFIFO):
    """A user's own admission policy: it stores a call's new keys up to the first
    one divisible by 3 when the tier is full, and records what it was asked."""

    name: ClassVar[str] = "recording_admit_fifo"

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def admit(self, keys: Sequence[Key], new: Sequence[Key]) -> list[Key]:
        self.calls.append(("admit", list(keys), list(new)))
        if len(self.blocks) + len(new) <= self.capacity:
            return list(new)
        cut = next((k for k, key in enumerate(new) if isinstance(key, int) and key % 3 == 0), None)
        return list(new[:cut])


USER = "user:recording_fifo"
USER_ADMIT = "user:recording_admit_fifo"
# Every policy, admission policies included, on both cores.
DIFF_POLICIES = [*POLICIES, USER, USER_ADMIT]

KEYS = st.lists(st.integers(0, 11), min_size=0, max_size=5)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("lookup"), KEYS),
        st.tuples(st.just("touch"), KEYS),
        st.tuples(st.just("prepare_store"), KEYS),
        st.tuples(st.just("complete_store"), KEYS, st.booleans()),
        st.tuples(st.just("prepare_load"), KEYS),
        st.tuples(st.just("complete_load"), KEYS),
        st.tuples(st.just("remove"), KEYS),
        st.tuples(st.just("prepare_store"), st.just(["x", 1])),
        st.tuples(st.just("prepare_load"), st.just([1, [2]])),
        st.tuples(st.just("remove"), st.just([1, [2]])),
        # The same calls on keys that make them succeed, so blocks become
        # ready, pinned and evictable often enough to exercise the order.
        st.tuples(st.just("complete_store"), st.just(WRITTEN), st.booleans()),
        st.tuples(st.just("prepare_load"), st.just(READY)),
        st.tuples(st.just("complete_load"), st.just(PINNED)),
        st.tuples(st.just("store"), KEYS),
        st.tuples(st.just("store"), KEYS),
        st.tuples(st.just("store"), KEYS),
    ),
    min_size=20,
    max_size=100,
)


def _pair(policy: str, capacity: int, block_size: int) -> tuple[OffloadingManager, ...]:
    """A manager on each core: (compiled, Python reference)."""
    kwargs: dict[str, Any] = {"block_size": block_size, "enable_events": True}
    if policy in (USER, USER_ADMIT):
        make = RecordingFIFO if policy == USER else lambda: RecordingAdmitFIFO(capacity)
        return (
            OffloadingManager(capacity, policy=make(), native=True, **kwargs),
            OffloadingManager(capacity, policy=make(), native=False, **kwargs),
        )
    return (
        OffloadingManager(capacity, policy=policy, native=True, **kwargs),
        OffloadingManager(capacity, policy=policy, native=False, **kwargs),
    )


def _resolve(keys: object, python: OffloadingManager) -> list[Any]:
    """Stand-ins: the keys of ``python`` being written, ready, or pinned, in key order."""
    if isinstance(keys, list):
        return keys
    wanted = {WRITTEN: lambda r: r < 0, READY: lambda r: r >= 0, PINNED: lambda r: r > 0}[keys]
    return [k for k in range(12) if (block := python.get(k)) is not None and wanted(block.ref_cnt)]


def _apply(mgr: OffloadingManager, name: str, args: list[Any]) -> object:
    try:
        if name == "store":  # the whole handshake: prepare, then complete what it returned
            out = mgr.prepare_store(*args)
            if out is not None:
                mgr.complete_store(out.block_hashes_to_store)
            return out
        return getattr(mgr, name)(*args)
    except KVActorsError as exc:
        return (type(exc).__name__, str(exc))


def _order(mgr: OffloadingManager) -> object:
    """The policy's order data: the compiled core's report, or the Python policy's."""
    if mgr.native and isinstance(mgr.policy_name, str) and mgr.policy is None:
        return mgr._core.policy_state()  # type: ignore[attr-defined]
    policy = mgr.policy
    assert policy is not None
    if isinstance(policy, RecordingFIFO):
        return (list(policy.blocks), policy.calls)
    return policy.order_state()  # type: ignore[attr-defined]


def _state(mgr: OffloadingManager, key: Key) -> tuple[int, int] | None:
    block = mgr.get(key)
    return None if block is None else (block.block_id, block.ref_cnt)


def _agree(native: OffloadingManager, python: OffloadingManager, op: object) -> None:
    assert native.stats() == python.stats(), op
    assert native.take_events() == python.take_events(), op
    assert _order(native) == _order(python), op
    assert len(native) == len(python)
    assert [_state(native, k) for k in range(12)] == [_state(python, k) for k in range(12)], op


@needs_native
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("policy", DIFF_POLICIES)
@given(ops=OPS, capacity=st.integers(1, 6))
@settings(max_examples=75, deadline=None)
def test_native_and_python_managers_agree(
    policy: str, block_size: int, ops: list[tuple[Any, ...]], capacity: int
) -> None:
    native, python = _pair(policy, capacity, block_size)
    for op in ops:
        name, keys, *rest = op
        args = [_resolve(keys, python), *rest]
        assert _apply(native, name, args) == _apply(python, name, args), op
        _agree(native, python, op)


@needs_native
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("policy", DIFF_POLICIES)
@pytest.mark.parametrize("seed", range(2))
def test_long_seeded_runs_agree(policy: str, block_size: int, seed: int) -> None:
    """Thousands of handshakes on a small cache: ghost hits, target moves and
    clock rises that short generated examples reach only rarely."""
    rng = random.Random(seed)
    native, python = _pair(policy, 4, block_size)
    for step in range(1500):
        keys = rng.sample(range(16), rng.randint(1, 4))
        roll = rng.random()
        name = "touch" if roll < 0.3 else "remove" if roll < 0.35 else "store"
        if roll > 0.9:  # a reader holds a block across the next steps
            name, keys = "prepare_load", _resolve(READY, python)[:1]
        elif roll > 0.8:
            name, keys = "complete_load", _resolve(PINNED, python)[:1]
        assert _apply(native, name, [keys]) == _apply(python, name, [keys]), (step, name, keys)
        assert _order(native) == _order(python), step
    assert native.stats() == python.stats()
    assert native.stats().evictions > 100


@needs_native
def test_weighted_lru_priorities_follow_the_block_size() -> None:
    """size ** size_weight divides each block's weight on both cores (it used to be
    ignored by the compiled one)."""
    for native in (True, False):
        mgr = OffloadingManager(4, block_size=4, policy="weighted_lru", native=native)
        out = mgr.prepare_store([1])
        assert out is not None
        mgr.complete_store([1])
        mgr.touch([1])
        state = _order(mgr)
        assert state == ("weighted_lru", 0.0, {1: (2 / 4, 2)}), native


@needs_native
def test_user_policy_runs_on_the_compiled_core_by_default() -> None:
    policy = RecordingFIFO()
    mgr = OffloadingManager(2, block_size=8, policy=policy)
    assert mgr.native
    assert mgr.policy is policy
    assert mgr.policy_name == "recording_fifo"
    out = mgr.prepare_store([1, 2])
    assert out is not None
    mgr.complete_store([1, 2])
    assert policy.blocks[1].ref_cnt == 0  # the core keeps the policy's records current
    mgr.prepare_load([1])
    assert policy.blocks[1].ref_cnt == 1
    out = mgr.prepare_store([3])
    assert out is not None
    assert out.block_hashes_evicted == [2]  # 1 is pinned: FIFO takes the next idle one
    assert policy.calls[0] == ("insert_many", [(1, 0, -1, 8), (2, 1, -1, 8)])
    assert ("evict", 1, [2], []) in policy.calls


def test_python_manager_passes_the_same_sizes_to_a_policy() -> None:
    mgr = OffloadingManager(2, block_size=8, policy=LRUPolicy(), native=False)
    mgr.prepare_store([1])
    block = mgr.get(1)
    assert block is not None
    assert block.size == 8


@needs_native
def test_admission_policies_run_on_the_compiled_core() -> None:
    """An admitting policy, built-in or a user's own, runs on the compiled core by
    default: it is asked ``admit`` exactly where the Python manager asks it, and
    only the keys it admits are stored, listed and reported."""
    assert OffloadingManager(4, block_size=16, policy="prefix_admit").native
    assert OffloadingManager(4, block_size=16, policy="prefix_admit", native=True).native
    policy = RecordingAdmitFIFO(3)
    mgr = OffloadingManager(3, block_size=16, policy=policy, enable_events=True)
    assert mgr.native
    assert mgr.policy is policy
    out = mgr.prepare_store([1, 2])
    assert out is not None
    mgr.complete_store(out.block_hashes_to_store)
    out = mgr.prepare_store([1, 4, 6, 7])  # full: stores up to the first multiple of 3
    assert out is not None
    assert out.block_hashes_to_store == [4]
    assert out.store_spec.block_ids == [2]
    assert out.block_hashes_evicted == []
    assert ("admit", [1, 4, 6, 7], [4, 6, 7]) in policy.calls
    assert policy.calls[-1] == ("insert_many", [(4, 2, -1, 16)])
    mgr.complete_store([4])
    assert mgr.prepare_store([6, 9]) == mgr.prepare_store([3])  # all declined: empty, not None
    assert mgr.lookup([1, 4, 6]) == 2  # the chain stops at the declined key
    events = mgr.take_events()
    assert [(e.block_hashes, e.removed) for e in events] == [([1, 2], False), ([4], False)]
    stats = mgr.stats()
    assert (stats.used, stats.stores, stats.evictions, stats.failed_prepares) == (3, 3, 0, 0)


class BadAdmit(RecordingFIFO):
    """An admission policy whose answer breaks the contract."""

    name: ClassVar[str] = "bad_admit"

    def __init__(self, answer: Any) -> None:
        super().__init__()
        self.answer = answer

    def admit(self, keys: Sequence[Key], new: Sequence[Key]) -> Any:
        return self.answer(list(new))


@needs_native
@pytest.mark.parametrize(
    "answer",
    [
        lambda new: new[1:],  # not a leading part
        lambda new: [*new, 99],  # more keys than asked
        lambda new: 5,  # not a list of keys
        lambda new: [float(new[0])],  # an equal key of another type
        lambda new: [new[0].to_bytes(1, "big")],
    ],
)
def test_admit_answer_is_checked_on_both_cores(answer: Any) -> None:
    errors = []
    for native in (True, False):
        mgr = OffloadingManager(4, block_size=16, policy=BadAdmit(answer), native=native)
        before = mgr.stats()
        with pytest.raises(PolicyError, match="admit returned") as info:
            mgr.prepare_store([1, 2])
        errors.append(str(info.value).replace(repr(mgr.policy), "POLICY"))
        assert mgr.stats() == before
        assert len(mgr) == 0
    assert errors[0] == errors[1]


class StoreShortChains(LRUPolicy):
    """docs/manager.md's example of a user's own admitting policy."""

    name: ClassVar[str] = "store_short_chains"

    def admit(self, keys: Sequence[Key], new_keys: Sequence[Key]) -> list[Key]:
        return list(new_keys[:4])


@pytest.mark.parametrize("native", [None, False])
def test_docs_admitting_policy_example(native: bool | None) -> None:
    mgr = OffloadingManager(1024, block_size=16, policy=StoreShortChains(), native=native)
    assert mgr.native == (manager.NATIVE and native is None)
    out = mgr.prepare_store(list(range(6)))
    assert out is not None
    assert out.block_hashes_to_store == [0, 1, 2, 3]
    assert len(out.store_spec.block_ids) == 4
    mgr.complete_store(out.block_hashes_to_store)
    assert mgr.lookup(list(range(6))) == 4


# -- the NVMe tier's manager reading its keys from the index's table ----------------

INDEX_KEYS: list[Key] = [
    *range(-2, 6),
    *(bytes([i]) * (i + 1) for i in range(8)),
    2**70,
    -(2**65),
    3**400,  # a big int of more than 64 bytes
]


class IntKey(int):
    """An int subclass: found as the int it equals, as a dict finds it."""


class BytesKey(bytes):
    pass


class SameAs:
    """A key of no key type that equals the key it was made from (its hash
    too): a dict finds the held key through it."""

    def __init__(self, key: object) -> None:
        self.key = key

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return bool(other == self.key)


# Keys that are not exact int/bytes: looked up as a dict does, against every key held.
FOREIGN_KEYS: list[Any] = [
    True,
    False,
    1.0,
    2.0**70,
    IntKey(3),
    BytesKey(b"\x01\x01"),
    SameAs(4),
    SameAs(b"\x02" * 3),
    SameAs(2**70),
    7.5,
]


def _index_pair(
    policy: str, capacity: int, directory: Path, rng: random.Random
) -> tuple[OffloadingManager, OffloadingManager, NVMeIndex]:
    """An index holding a random history, and a manager of each core restored
    from it (the compiled one attached to its table)."""
    index = NVMeIndex(directory, 4096, capacity, 1, sync=False, native=True)
    for _ in range(rng.randint(0, 3 * capacity)):
        index.put([(rng.choice(INDEX_KEYS), rng.randrange(capacity), 0)], sync=False)
    native, python = _pair(policy, capacity, 1)
    assert native.restore_index(index) == python.restore_index(index) == len(index)
    return native, python, index


def _index_agree(
    native: OffloadingManager, python: OffloadingManager, step: object, keys: list[Any] = INDEX_KEYS
) -> None:
    assert native.stats() == python.stats(), step
    assert native.take_events() == python.take_events(), step
    assert _order(native) == _order(python), step
    assert [_state(native, k) for k in keys] == [_state(python, k) for k in keys], step
    assert [k in native for k in keys] == [k in python for k in keys], step


@needs_native
@pytest.mark.parametrize("policy", DIFF_POLICIES)
@pytest.mark.parametrize("seed", range(3))
def test_manager_sharing_the_index_table_agrees(policy: str, seed: int, tmp_path: Path) -> None:
    """``restore_index`` on the compiled core keeps no copy of the keys the
    index records (nor a map of them: it finds them through the index's own
    hash): the same answers as the reference, while the index changes its
    records under it as the tier does (a store's ``Put`` between prepare and
    complete, or none when the write failed) and as it may otherwise (a
    ``Put`` of another key over a slot, a key moving slot, a ``Del``)."""
    _index_steps(policy, seed, tmp_path, foreign_from=None)


@needs_native
@pytest.mark.parametrize("policy", ["lru", "arc", "prefix_admit"])
@pytest.mark.parametrize("seed", range(2))
def test_manager_sharing_the_index_table_finds_keys_of_other_types(
    policy: str, seed: int, tmp_path: Path
) -> None:
    """Halfway through, lookups with keys that are not exact int/bytes (an
    int subclass, True, a float, an object that equals a key): found as a dict
    finds them, and the same answers as the reference before and after."""
    _index_steps(policy, seed, tmp_path, foreign_from=150)


def _index_steps(policy: str, seed: int, tmp_path: Path, foreign_from: int | None) -> None:
    rng = random.Random(seed)
    capacity = rng.randint(2, 6)
    native, python, index = _index_pair(policy, capacity, tmp_path, rng)
    _index_agree(native, python, "restored")
    for step in range(300 if foreign_from is not None else 400):
        keys = rng.sample(INDEX_KEYS, rng.randint(1, 4))
        foreign = foreign_from is not None and step >= foreign_from
        roll = rng.random()
        if foreign and roll < 0.25:
            asked = [rng.choice(FOREIGN_KEYS), *keys]
            assert native.lookup(asked) == python.lookup(asked), step
            native.touch(asked)
            python.touch(asked)
        elif roll < 0.5:
            outs = [mgr.prepare_store(keys) for mgr in (native, python)]
            assert outs[0] == outs[1], (step, keys)
            if outs[1] is not None:
                new = outs[1].block_hashes_to_store
                slots = outs[1].store_spec.block_ids
                ok = rng.random() < 0.85
                if ok and new:
                    index.put([(k, s, 0) for k, s in zip(new, slots)], sync=False)
                done = [mgr.complete_store(new, ok) for mgr in (native, python)]
                assert done[0] == done[1], step
        elif roll < 0.65:
            assert native.lookup(keys) == python.lookup(keys), step
            native.touch(keys)
            python.touch(keys)
        elif roll < 0.72:
            assert native.remove(keys) == python.remove(keys), step
        elif roll < 0.8:
            ready = [k for k in keys if (b := python.get(k)) is not None and b.ref_cnt >= 0]
            assert native.prepare_load(ready) == python.prepare_load(ready), step
            for mgr in (native, python):
                mgr.complete_load(ready)
        elif roll < 0.9:  # the index alone: another key over a slot, or a key moving slot
            index.put([(rng.choice(INDEX_KEYS), rng.randrange(capacity), 0)], sync=False)
        else:
            index.delete(keys)
        _index_agree(native, python, (step, roll, keys))
        if foreign:
            _index_agree(native, python, (step, "foreign"), FOREIGN_KEYS)
    index.close()


@needs_native
@pytest.mark.parametrize("policy", ["lru", "arc"])
def test_restore_index_orders_a_long_history_oldest_first(policy: str, tmp_path: Path) -> None:
    """Live records whose sequence numbers span many times their count (one
    never rewritten while the others were, again and again): restored oldest
    first on both cores, as the reference restores ``entries()``."""
    rng = random.Random(5)
    index = NVMeIndex(tmp_path, 4096, 16, 1, sync=False, native=True)
    index.put([(b"first", 3, 0)], sync=False)
    for _ in range(400):
        index.put([(rng.randrange(10**6), rng.choice([0, 1, 2, *range(4, 16)]), 0)], sync=False)
    native, python = _pair(policy, 16, 1)
    assert native.restore_index(index) == python.restore_index(index) == len(index) == 16
    _index_agree(native, python, "restored", [k for k, _, _ in index.table.entries()])
    assert native.lookup([b"first"]) == 1
    index.close()


@needs_native
def test_the_nvme_tier_manager_maps_no_key_the_index_records(tmp_path: Path) -> None:
    """Restored from the index, the compiled core's own memory is its per-slot
    arrays (21 B a slot with lru), no map of the keys; the first lookup of a
    key that is not exact int/bytes maps them all (8 B a bucket, <= 70 % full)."""
    n = 20_000
    index = NVMeIndex(tmp_path, 4096, n, 1, sync=False, native=True)
    index.put([(i.to_bytes(8, "little"), i, 0) for i in range(n)], sync=False)
    mgr = OffloadingManager(n, block_size=1, native=True)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        assert mgr.restore_index(index) == n
        restored = tracemalloc.get_traced_memory()[0] - base
        assert mgr.lookup([IntKey(5), b"x"]) == 0
        assert mgr.lookup([BytesKey((5).to_bytes(8, "little"))]) == 1
        mapped = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert restored < n * 24, restored / n
    assert mapped - restored >= n * 8 / 0.7, (mapped - restored) / n
    index.close()


@needs_native
def test_restore_index_restores_records_that_share_a_sequence_number(tmp_path: Path) -> None:
    """Two live records with one sequence number (not written by the index, but
    its table takes them): both restored."""
    index = NVMeIndex(tmp_path, 4096, 8, 1, sync=False, native=True)
    table = index.table
    table.put(b"a", 1, 0, 5)
    table.put(b"b", 6, 0, 5)
    table.put(b"c", 2, 0, 4)
    mgr = OffloadingManager(8, block_size=1, native=True)
    assert mgr.restore_index(index) == 3
    assert mgr.lookup([b"c"]) == mgr.lookup([b"a"]) == mgr.lookup([b"b"]) == 1
    name, order = mgr._core.policy_state()  # type: ignore[attr-defined]
    assert (name, order[0], sorted(order[1:])) == ("lru", b"c", [b"a", b"b"])  # oldest first
    index.close()


@needs_native
def test_restore_index_refuses_a_used_manager(tmp_path: Path) -> None:
    index = NVMeIndex(tmp_path, 4096, 8, 1, sync=False, native=True)
    index.put([(b"a", 1, 0), (5, 2, 0)], sync=False)
    for native in (True, False):
        mgr = OffloadingManager(8, block_size=1, native=native)
        mgr.prepare_store([b"z"])
        with pytest.raises(BlockStateError, match="not empty"):
            mgr.restore_index(index)
    mgr = OffloadingManager(8, block_size=1, native=True)
    assert mgr.restore_index(index) == 2
    other = OffloadingManager(8, block_size=1, native=True)
    with pytest.raises(RuntimeError, match="another manager"):
        other.restore_index(index)  # one manager shares a table
    index.close()


@needs_native
@pytest.mark.parametrize("policy", DIFF_POLICIES)
def test_restore_after_a_refused_store_agrees(policy: str) -> None:
    """A store of more keys than the tier holds is refused (an admission policy
    may have chosen classes for them by then); a restore that follows, then
    handshakes, leave both cores in the same state."""
    native, python = _pair(policy, 3, 16)
    refused = _apply(native, "prepare_store", [[1, 2, 3, 4, 5]])
    assert refused == _apply(python, "prepare_store", [[1, 2, 3, 4, 5]])
    assert refused is None or policy == USER_ADMIT  # that one stores 1 and 2
    pairs = [(2, 0), (9, 2), (4, 1)]
    assert _apply(native, "restore", [pairs]) == _apply(python, "restore", [pairs])
    _agree(native, python, "restore")
    for keys in ([2, 9, 7], [8, 4], [2, 7, 10]):
        assert _apply(native, "touch", [keys]) == _apply(python, "touch", [keys])
        assert _apply(native, "store", [keys]) == _apply(python, "store", [keys])
        _agree(native, python, keys)
