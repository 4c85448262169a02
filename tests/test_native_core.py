"""The compiled manager core (native/manager_core.c) against the Python manager.

The scenario tests and the state machine already run both cores against the
same expectations; here random operation sequences drive one manager of each
core side by side and every answer, error, event and snapshot must agree.
"""

from __future__ import annotations

import random
import shutil
import sysconfig
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvactors import OffloadingManager, manager
from kvactors.errors import BlockNotPinnedError, ConfigError, InvalidKeyError, KVActorsError
from kvactors.media import file_store
from kvactors.policy import ARCPolicy, LRUPolicy, WeightedLRUPolicy

WRITTEN, READY, PINNED = "written", "ready", "pinned"
needs_native = pytest.mark.skipif(not manager.NATIVE, reason="compiled core not built")


def _compiler() -> str | None:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc)


@pytest.mark.skipif(_compiler() is None, reason="no C compiler to build the core with")
def test_core_is_built_where_a_compiler_exists() -> None:
    assert manager.NATIVE, "setup.py builds kvactors._manager_core; the build failed"
    assert file_store._io_vectored is not None, "setup.py builds kvactors._io_core; it failed"
    mgr = OffloadingManager(4, block_size=16)
    assert mgr.native
    assert mgr.policy is None
    assert mgr.policy_name == "lru"


def test_native_choice_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if built (it is refused before any core is made): a policy object is Python only.
    monkeypatch.setattr(manager, "_ManagerCore", manager._ManagerCore or object)
    with pytest.raises(ConfigError, match="built-in policies by name only"):
        OffloadingManager(4, block_size=16, policy=ARCPolicy(4), native=True)
    python = OffloadingManager(4, block_size=16, native=False)
    assert not python.native
    assert python.policy is not None
    monkeypatch.setattr(manager, "_ManagerCore", None)
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
    assert (block.block_id, block.ref_cnt) == (0, 1)
    with pytest.raises(BlockNotPinnedError, match="7"):
        mgr.complete_load([7, 7])  # pinned once: the second unpin fails, the first is undone
    assert mgr.stats().pinned == 1
    mgr.complete_load([7])
    assert mgr.stats().pinned == 0


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


def _resolve(keys: object, python: OffloadingManager) -> list[int]:
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


@needs_native
@pytest.mark.parametrize("policy", ["lru", "arc", "weighted_lru"])
@given(ops=OPS, capacity=st.integers(1, 6))
@settings(max_examples=300, deadline=None)
def test_native_and_python_managers_agree(
    policy: str, ops: list[tuple[Any, ...]], capacity: int
) -> None:
    kwargs: dict[str, Any] = {"block_size": 16, "policy": policy, "enable_events": True}
    native = OffloadingManager(capacity, native=True, **kwargs)
    python = OffloadingManager(capacity, native=False, **kwargs)
    assert python.policy is not None
    for op in ops:
        name, keys, *rest = op
        args = [_resolve(keys, python), *rest]
        assert _apply(native, name, args) == _apply(python, name, args), op
        assert native.stats() == python.stats(), op
        assert native.take_events() == python.take_events(), op
        order = list(python.policy.keys())
        assert [_state(native, k) for k in order] == [_state(python, k) for k in order], op
        assert len(native) == len(python)
        state = native._core.policy_state()  # type: ignore[attr-defined]
        assert state == _policy_state(python.policy), op
        assert [k for k in range(12) if k in native] == [k for k in range(12) if k in python]


def _policy_state(policy: object) -> tuple[object, ...]:
    """The Python policy's order data, in the shape the compiled core reports it."""
    if isinstance(policy, LRUPolicy):
        return ("lru", list(policy.keys()))
    if isinstance(policy, ARCPolicy):
        lists = [list(lst) for lst in (policy.t1, policy.t2, policy.b1, policy.b2)]
        return ("arc", policy.target, *lists)
    assert isinstance(policy, WeightedLRUPolicy)
    live = {key: (policy._prio[key][0], policy._freq[key]) for key in policy.keys()}  # noqa: SIM118
    return ("weighted_lru", policy.clock, live)


def _state(mgr: OffloadingManager, key: int) -> tuple[int, int] | None:
    block = mgr.get(key)
    return None if block is None else (block.block_id, block.ref_cnt)


@needs_native
@pytest.mark.parametrize("policy", ["lru", "arc", "weighted_lru"])
@pytest.mark.parametrize("seed", range(4))
def test_long_seeded_runs_agree(policy: str, seed: int) -> None:
    """Thousands of handshakes on a small cache: ghost hits, target moves and
    clock rises that short generated examples reach only rarely."""
    rng = random.Random(seed)
    kwargs: dict[str, Any] = {"block_size": 16, "policy": policy, "enable_events": True}
    native = OffloadingManager(4, native=True, **kwargs)
    python = OffloadingManager(4, native=False, **kwargs)
    assert python.policy is not None
    for step in range(3000):
        keys = rng.sample(range(16), rng.randint(1, 4))
        roll = rng.random()
        name = "touch" if roll < 0.3 else "remove" if roll < 0.35 else "store"
        if roll > 0.9:  # a reader holds a block across the next steps
            name, keys = "prepare_load", _resolve(READY, python)[:1]
        elif roll > 0.8:
            name, keys = "complete_load", _resolve(PINNED, python)[:1]
        assert _apply(native, name, [keys]) == _apply(python, name, [keys]), (step, name, keys)
        state = native._core.policy_state()  # type: ignore[attr-defined]
        assert state == _policy_state(python.policy), step
    assert native.stats() == python.stats()
    assert native.stats().evictions > 100


@pytest.mark.parametrize("core", ["native", "python"])
def test_argument_checks_agree_on_both_paths(core: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if core == "python":
        monkeypatch.setattr(manager, "_first_bad_key", None)
        monkeypatch.setattr(manager, "_first_bad_slot", None)
    elif not manager.NATIVE:
        pytest.skip("compiled core not built")
    for ids, ok in [
        ([0, 1, 3], True),
        ([3], True),
        ([], False),
        ([0, 4], False),  # out of range
        ([-1, 0], False),
        ([1, 1], False),  # named twice
        ([0, True], False),  # not a plain int
        ([0, 1.0], False),
        ([0, 2**70], False),
        ((0, 1), False),  # not a list: the caller converts and checks
    ]:
        assert manager.distinct_slots(ids, 4) is ok, ids
    manager.check_keys([1, b"x", 2])
    with pytest.raises(InvalidKeyError, match="'a' has type str"):
        manager.check_keys([1, "a"])  # type: ignore[list-item]
    with pytest.raises(InvalidKeyError, match="b'x' is named twice"):
        manager.check_keys([b"x", 1, b"x"], "store")
