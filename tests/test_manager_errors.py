"""Both cores agree on errors, check a whole call before changing anything, and
survive hostile keys (issue classes: errors that change state, a use after
free in the compiled core, the two cores disagreeing)."""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator, Sequence
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _managers import MANAGER_POLICIES, make_manager
from kvactors import OffloadingManager, manager
from kvactors.errors import (
    BlockStateError,
    ConfigError,
    InvalidKeyError,
    KVActorsError,
    ManagerBusyError,
    PolicyError,
    UnknownPolicyError,
)
from kvactors.policy import BlockStatus, Key, LRUPolicy

CORES = [False, True] if manager.NATIVE else [False]


def _snapshot(mgr: OffloadingManager, keys: Iterable[object]) -> object:
    blocks = {}
    for k in keys:
        b = mgr.get(k)  # type: ignore[arg-type]
        blocks[k] = None if b is None else (b.block_id, b.ref_cnt)
    return blocks, mgr.stats()


def _ready(mgr: OffloadingManager, keys: list[Any]) -> None:
    out = mgr.prepare_store(keys)
    assert out is not None
    mgr.complete_store(out.block_hashes_to_store)


@pytest.mark.parametrize("policy", MANAGER_POLICIES)
def test_a_bad_key_anywhere_changes_nothing(policy: str) -> None:
    mgr = make_manager(4, policy)
    _ready(mgr, [1, 3])
    before = _snapshot(mgr, [1, 3])
    for call in (
        lambda: mgr.prepare_load([1, [2]]),
        lambda: mgr.complete_load([1, {2}]),
        lambda: mgr.remove([1, [2]]),
        lambda: mgr.prepare_store([5, [2]]),
        lambda: mgr.complete_store([1, [2]]),
        lambda: mgr.touch([3, [2]]),
        lambda: mgr.lookup([1, 3, [2]]),
    ):
        with pytest.raises(InvalidKeyError, match="is not usable"):
            call()
        assert _snapshot(mgr, [1, 3]) == before
    with pytest.raises(InvalidKeyError):
        mgr.get([1])  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError):
        [1] in mgr  # noqa: B015
    mgr.prepare_load([1])  # pinning still works and is undone cleanly
    mgr.complete_load([1])
    assert _snapshot(mgr, [1, 3]) == before


@pytest.mark.parametrize("policy", MANAGER_POLICIES)
def test_restore_checks_every_pair_first(policy: str) -> None:
    mgr = make_manager(4, policy)
    with pytest.raises(InvalidKeyError, match="slot id None of key b'b' is not an int"):
        mgr.restore([(b"a", 0), (b"b", None)])  # type: ignore[list-item]
    with pytest.raises(InvalidKeyError, match=r"slot id 1\.5"):
        mgr.restore([(b"a", 0), (b"b", 1.5)])  # type: ignore[list-item]
    with pytest.raises(InvalidKeyError, match="item 1 is not a"):
        mgr.restore([(b"a", 0), b"b"])  # type: ignore[list-item]
    assert len(mgr) == 0
    with pytest.raises(InvalidKeyError, match="slot id True"):
        mgr.restore([(b"c", True)])  # type: ignore[list-item]
    assert mgr.restore([(b"a", 0), (b"b", 2), (b"c", 9), ("d", 1)]) == [b"a", b"b"]
    # never two keys in one slot: the free slots are 1 and 3, lowest first
    out = mgr.prepare_store([b"x", b"y"])
    assert out is not None
    assert out.store_spec.block_ids == [1, 3]
    ids = [b.block_id for k in (b"a", b"b", b"x", b"y") if (b := mgr.get(k))]
    assert sorted(ids) == [0, 1, 2, 3]


@pytest.mark.parametrize("native", CORES)
def test_both_cores_raise_the_same_constructor_errors(native: bool) -> None:
    with pytest.raises(ConfigError, match=r"num_blocks must be an int in 1\.\.2147483647"):
        OffloadingManager(2**31, block_size=16, native=native)
    big = OffloadingManager(2**31 - 1, block_size=16, native=native)
    assert big.num_free_blocks == 2**31 - 1
    known = "arc, lru, prefix_admit, weighted_lru"
    with pytest.raises(UnknownPolicyError, match=f"'bogus'; supported: {known}"):
        OffloadingManager(4, block_size=16, policy="bogus", native=native)
    with pytest.raises(UnknownPolicyError, match="got NoneType"):
        OffloadingManager(4, block_size=16, policy=None, native=native)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="block_size"):
        OffloadingManager(4, block_size=0, native=native)
    # Past a C ssize_t the compiled core raised OverflowError, the Python one took it.
    for size in (2**63, 2**70):
        with pytest.raises(
            ConfigError, match=r"^block_size must be a positive int up to 2\*\*63 - 1"
        ):
            OffloadingManager(4, block_size=size, native=native)
    widest = OffloadingManager(4, block_size=2**63 - 1, native=native, enable_events=True)
    out = widest.prepare_store([1])
    assert out is not None
    widest.complete_store([1])
    block = widest.get(1)
    assert block is not None
    assert (block.block_id, block.ref_cnt, block.size) == (0, 0, 2**63 - 1)
    assert widest.take_events()[0].block_size == 2**63 - 1
    with pytest.raises(ConfigError, match="medium must be a str, got int"):
        OffloadingManager(4, block_size=16, medium=3, native=native)  # type: ignore[arg-type]


def key_calls(mgr: OffloadingManager) -> dict[str, Any]:
    """Every manager method that takes a call's keys, by name."""
    names = ["lookup", "touch", "prepare_store", "complete_store", "prepare_load"]
    names += ["complete_load", "remove", "restore"]
    return {name: getattr(mgr, name) for name in names}


@pytest.mark.parametrize("native", CORES)
@pytest.mark.parametrize("keys", [None, 7, 1.5])
def test_keys_that_are_not_iterable_are_an_invalid_key_on_both_cores(
    native: bool, keys: object
) -> None:
    mgr = OffloadingManager(4, block_size=16, native=native)
    calls = key_calls(mgr)
    kind = type(keys).__name__
    for name, call in calls.items():
        with pytest.raises(
            InvalidKeyError, match=f"^{name}: keys must be an iterable of keys, got {kind}$"
        ):
            call(keys)
    assert mgr.stats().lookups == 0
    assert len(mgr) == 0


@pytest.mark.parametrize("native", CORES)
@pytest.mark.parametrize("keys", [b"ab", bytearray(b"ab"), memoryview(b"ab"), "ab"])
def test_one_key_where_keys_go_is_an_invalid_key_on_both_cores(native: bool, keys: object) -> None:
    """A bytes key (or a string) passed bare is refused, not iterated: its items
    (the ints 97 and 98, or characters) would be taken for keys and stored."""
    mgr = OffloadingManager(4, block_size=16, native=native)
    calls = key_calls(mgr)
    kind = type(keys).__name__
    for name, call in calls.items():
        with pytest.raises(
            InvalidKeyError,
            match=rf"^{name}: keys must be an iterable of keys, got one {kind} "
            r"\(for a single key, pass \[key\]\)$",
        ):
            call(keys)
    assert mgr.stats().lookups == 0
    assert len(mgr) == 0
    assert mgr.prepare_store([b"ab"]) is not None  # as one key in a list it is fine


@pytest.mark.skipif(not manager.NATIVE, reason="compiled core not built")
def test_slots_are_allocated_as_they_are_used() -> None:
    mgr = OffloadingManager(2**31 - 1, block_size=16, policy="arc", native=True)
    core = mgr._core  # type: ignore[attr-defined]
    assert core.allocated() == 0
    _ready(mgr, list(range(100)))
    assert 100 <= core.allocated() <= 256
    other = OffloadingManager(2**31 - 1, block_size=16, native=True)
    other.restore([(b"a", 1000)])
    assert other._core.allocated() <= 2048  # type: ignore[attr-defined]
    assert other.prepare_store([b"b"]).store_spec.block_ids == [0]  # type: ignore[union-attr]


class Hostile(int):
    """An int key whose __hash__ and __eq__ empty the list the caller passed."""

    victim: ClassVar[list[Any]] = []

    def __hash__(self) -> int:
        Hostile.victim.clear()
        return int.__hash__(self)

    def __eq__(self, other: object) -> bool:
        Hostile.victim.clear()
        return int(self) == other

    __ne__ = int.__ne__


class Raising:
    """A key whose __hash__ raises."""

    def __hash__(self) -> int:
        raise ValueError("no hash for you")


HOSTILE = st.one_of(
    st.integers(0, 7),
    st.integers(0, 7).map(Hostile),
    st.builds(Raising),
    st.builds(list, st.just([1])),
    st.just("s"),
)
METHODS = [
    "lookup",
    "touch",
    "prepare_store",
    "complete_store",
    "prepare_load",
    "complete_load",
    "remove",
    "get",
    "contains",
]


def _call(mgr: OffloadingManager, name: str, keys: list[Any]) -> object:
    Hostile.victim = keys  # the list the manager was given
    try:
        if name == "get":
            b = mgr.get(keys[0]) if keys else None
            return None if b is None else (b.block_id, b.ref_cnt)
        if name == "contains":
            return bool(keys) and keys[0] in mgr
        if name == "complete_store":
            return mgr.complete_store(keys, True)
        out = getattr(mgr, name)(keys)
        return out
    except KVActorsError as exc:
        return (type(exc).__name__, str(exc))


@pytest.mark.parametrize("policy", ["lru", "arc", "weighted_lru"])
@given(
    ops=st.lists(
        st.tuples(st.sampled_from([*METHODS, "store"]), st.lists(HOSTILE, max_size=5)), max_size=40
    )
)
@settings(max_examples=60, deadline=None)
def test_hostile_keys_crash_nothing_and_both_cores_agree(
    policy: str, ops: list[tuple[str, list[Any]]]
) -> None:
    managers = [OffloadingManager(4, block_size=16, policy=policy, native=n) for n in CORES]
    for name, keys in ops:
        results = []
        for mgr in managers:
            if name == "store":  # a plain handshake between the hostile calls
                plain = [int(k) for k in keys if type(k) in (int, Hostile)]
                results.append(_call(mgr, "prepare_store", list(dict.fromkeys(plain))))
                mgr.complete_store([k for k in plain if k in mgr])
            else:
                results.append(_call(mgr, name, list(keys)))
        assert all(r == results[0] for r in results), (name, keys, results)
        stats = [m.stats() for m in managers]
        assert all(s == stats[0] for s in stats), (name, keys)


@pytest.mark.parametrize("native", CORES)
def test_a_raising_hash_is_an_invalid_key_on_both_cores(native: bool) -> None:
    mgr = OffloadingManager(4, block_size=16, native=native)
    for call in (mgr.lookup, mgr.touch, mgr.prepare_store, mgr.prepare_load, mgr.remove):
        with pytest.raises(InvalidKeyError, match="type Raising is not usable") as info:
            call([Raising()])
        assert isinstance(info.value.__cause__, ValueError)


class Broken(LRUPolicy):
    """Returns a pinned block from evict."""

    name: ClassVar[str] = "broken"

    def evict(self, n: int, protected: Container[Key]) -> list[tuple[Key, BlockStatus]] | None:
        key = next(iter(self._blocks))
        return [(key, self._blocks.pop(key))] * n


@pytest.mark.parametrize("native", CORES)
def test_a_policy_that_breaks_its_contract_is_named(native: bool) -> None:
    mgr = OffloadingManager(1, block_size=16, policy=Broken(), native=native)
    _ready(mgr, [1])
    mgr.prepare_load([1])
    with pytest.raises(PolicyError, match="not idle"):
        mgr.prepare_store([2])


class Reentrant(LRUPolicy):
    name: ClassVar[str] = "reentrant"
    manager: OffloadingManager | None = None

    def touch(self, keys: Sequence[Key]) -> None:
        assert self.manager is not None
        self.manager.lookup(keys)


@pytest.mark.skipif(not manager.NATIVE, reason="compiled core not built")
def test_the_compiled_core_refuses_reentry() -> None:
    policy = Reentrant()
    mgr = OffloadingManager(2, block_size=16, policy=policy, native=True)
    policy.manager = mgr
    with pytest.raises(ManagerBusyError, match="already running"):
        mgr.touch([1])
    assert mgr.lookup([1]) == 0  # and it stays usable


class Iter(LRUPolicy):
    name: ClassVar[str] = "iter"

    def keys(self) -> Iterator[Key]:
        return iter(list(self._blocks))


@pytest.mark.parametrize("native", CORES)
def test_restore_into_a_used_manager_is_refused(native: bool) -> None:
    mgr = OffloadingManager(2, block_size=16, policy=Iter(), native=native)
    _ready(mgr, [1])
    with pytest.raises(BlockStateError, match="not empty"):
        mgr.restore([(2, 1)])


@pytest.mark.parametrize("native", CORES)
@pytest.mark.parametrize("index", [None, [(1, 0)], "index"])
def test_restore_index_of_something_else_is_the_same_error_on_both_cores(
    native: bool, index: object
) -> None:
    mgr = OffloadingManager(4, block_size=16, native=native)
    kind = type(index).__name__
    with pytest.raises(
        InvalidKeyError, match=f"^restore_index: expected an NVMeIndex, got {kind}$"
    ):
        mgr.restore_index(index)  # type: ignore[arg-type]
    assert len(mgr) == 0
