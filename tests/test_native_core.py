"""The compiled LRU core (native/lru_core.c) against the Python manager.

The scenario tests and the state machine already run both cores against the
same expectations; here random operation sequences drive one manager of each
core side by side and every answer, error, event and snapshot must agree.
"""

from __future__ import annotations

import shutil
import sysconfig
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvactors import OffloadingManager, manager
from kvactors.errors import BlockNotPinnedError, ConfigError, KVActorsError

needs_native = pytest.mark.skipif(not manager.NATIVE_LRU, reason="compiled core not built")


def _compiler() -> str | None:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc)


@pytest.mark.skipif(_compiler() is None, reason="no C compiler to build the core with")
def test_core_is_built_where_a_compiler_exists() -> None:
    assert manager.NATIVE_LRU, "setup.py builds kvactors._lru_core; the build failed"
    mgr = OffloadingManager(4, block_size=16)
    assert mgr.native and mgr.policy is None and mgr.policy_name == "lru"


def test_native_choice_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="'lru' policy only"):
        OffloadingManager(4, block_size=16, policy="arc", native=True)
    python = OffloadingManager(4, block_size=16, native=False)
    assert not python.native and python.policy is not None
    monkeypatch.setattr(manager, "_LRUCore", None)
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
    assert block is not None and (block.block_id, block.ref_cnt) == (0, 1)
    with pytest.raises(BlockNotPinnedError, match="7"):
        mgr.complete_load([7, 7])  # pinned once: the second unpin fails, the first is undone
    assert mgr.stats().pinned == 1
    mgr.complete_load([7])
    assert mgr.stats().pinned == 0


KEYS = st.lists(st.integers(0, 9), min_size=0, max_size=5)
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
    ),
    max_size=60,
)


def _apply(mgr: OffloadingManager, op: tuple[Any, ...]) -> object:
    name, keys, *rest = op
    try:
        result = getattr(mgr, name)(keys, *rest)
    except KVActorsError as exc:
        return (type(exc).__name__, str(exc))
    return result


@needs_native
@given(ops=OPS, capacity=st.integers(1, 6))
@settings(max_examples=300, deadline=None)
def test_native_and_python_managers_agree(ops: list[tuple[Any, ...]], capacity: int) -> None:
    native = OffloadingManager(capacity, block_size=16, enable_events=True, native=True)
    python = OffloadingManager(capacity, block_size=16, enable_events=True, native=False)
    assert python.policy is not None
    for op in ops:
        assert _apply(native, op) == _apply(python, op), op
        assert native.stats() == python.stats(), op
        assert native.take_events() == python.take_events(), op
        order = list(python.policy.keys())  # least recent first
        assert native._core.keys() == order, op  # type: ignore[attr-defined]
        assert [_state(native, k) for k in order] == [_state(python, k) for k in order], op
        assert [k for k in range(10) if k in native] == [k for k in range(10) if k in python]


def _state(mgr: OffloadingManager, key: int) -> tuple[int, int] | None:
    block = mgr.get(key)
    return None if block is None else (block.block_id, block.ref_cnt)
