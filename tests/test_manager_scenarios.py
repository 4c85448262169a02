"""OffloadingManager scenarios in the style of vLLM's kv_offload tests: each reads like
the handshake and checks exact slot ids, evictions and events."""

from __future__ import annotations

import pytest

from _managers import LRU_CORES, MANAGER_POLICIES, make_manager
from kvactors import OffloadingEvent, OffloadingManager
from kvactors.errors import (
    BlockNotFoundError,
    BlockNotPinnedError,
    BlockNotReadyError,
    ConfigError,
    InvalidKeyError,
    UnknownPolicyError,
)
from kvactors.policy import ARCPolicy


def stored(mgr: OffloadingManager, keys: list[int]) -> list[int]:
    out = mgr.prepare_store(keys)
    assert out is not None
    mgr.complete_store(out.block_hashes_to_store)
    return out.store_spec.block_ids


def ev(keys: list[int], removed: bool) -> OffloadingEvent:
    return OffloadingEvent(block_hashes=keys, block_size=16, medium="CPU", removed=removed)


@pytest.mark.parametrize("policy", MANAGER_POLICIES)
def test_store_complete_lookup(policy: str) -> None:
    """Fresh slots come in order; blocks are invisible until completed; lookup counts
    leading ready keys only; storing present keys again allocates nothing."""
    mgr = make_manager(4, policy, enable_events=True)
    out = mgr.prepare_store([1, 2, 3])
    assert out is not None
    assert out.block_hashes_to_store == [1, 2, 3]
    assert out.store_spec.block_ids == [0, 1, 2]
    assert out.block_hashes_evicted == []
    assert mgr.lookup([1, 2, 3]) == 0  # being written
    mgr.complete_store([1, 2, 3])
    assert mgr.lookup([1, 2, 3]) == 3
    assert mgr.lookup([1, 9, 3]) == 1
    again = mgr.prepare_store([1, 2, 3, 4])
    assert again is not None
    assert (again.block_hashes_to_store, again.store_spec.block_ids) == ([4], [3])
    mgr.complete_store([4])
    assert mgr.take_events() == [ev([1, 2, 3], False), ev([4], False)]
    assert mgr.take_events() == []
    stats = mgr.stats()
    assert (stats.capacity, stats.used, stats.free, stats.being_written) == (4, 4, 0, 0)


@pytest.mark.parametrize("policy", LRU_CORES)
def test_lru_evicts_least_recent_and_reuses_last_freed_first(policy: str) -> None:
    """Touch [3, 1] makes 3 most recent, then 1; victims come from the old end,
    and their slots are handed out last-freed-first."""
    mgr = make_manager(4, policy, enable_events=True)
    assert stored(mgr, [1, 2, 3, 4]) == [0, 1, 2, 3]
    mgr.take_events()
    mgr.touch([3, 1])  # reverse walk: 1 moves, then 3 -> order 2, 4, 1, 3
    out = mgr.prepare_store([5, 6])
    assert out is not None
    assert out.block_hashes_evicted == [2, 4]
    assert out.block_ids_evicted == [1, 3]
    assert out.store_spec.block_ids == [3, 1]  # last freed (4's slot 3) first
    assert mgr.take_events() == [ev([2, 4], True)]
    assert mgr.lookup([1]) == 1
    assert mgr.lookup([2]) == 0


@pytest.mark.parametrize("policy", MANAGER_POLICIES)
def test_pinned_and_unready_blocks_are_never_evicted(policy: str) -> None:
    """With every other block pinned or being written, prepare_store returns None
    and changes nothing; once unpinned the same call succeeds."""
    mgr = make_manager(3, policy)
    stored(mgr, [1, 2])
    assert mgr.prepare_store([3]) is not None  # 3 is now being written
    spec = mgr.prepare_load([1, 2])
    assert spec.block_ids == [0, 1]
    before = mgr.stats()
    assert mgr.prepare_store([4]) is None
    after = mgr.stats()
    assert (after.used, after.pinned, after.being_written) == (3, 2, 1)
    assert after.failed_prepares == before.failed_prepares + 1
    mgr.complete_load([1])
    out = mgr.prepare_store([4])
    assert out is not None
    assert out.block_hashes_evicted == [1]


@pytest.mark.parametrize("policy", MANAGER_POLICIES)
def test_keys_named_in_the_call_are_protected(policy: str) -> None:
    """prepare_store never evicts a key the same call names, even an idle one."""
    mgr = make_manager(2, policy)
    stored(mgr, [1, 2])
    assert mgr.prepare_store([1, 2, 3]) is None
    out = mgr.prepare_store([2, 3])
    assert out is not None
    assert out.block_hashes_evicted == [1]


@pytest.mark.parametrize("policy", MANAGER_POLICIES)
def test_failed_store_frees_slots_and_leaves_ready_keys(policy: str) -> None:
    mgr = make_manager(4, policy, enable_events=True)
    stored(mgr, [1])
    out = mgr.prepare_store([1, 2, 3])
    assert out is not None
    assert out.store_spec.block_ids == [1, 2]
    mgr.complete_store([1, 2, 3], success=False)
    assert mgr.lookup([1]) == 1  # ready keys are left alone
    assert 2 not in mgr
    assert mgr.stats().free == 3
    nxt = mgr.prepare_store([4, 5])
    assert nxt is not None
    assert nxt.store_spec.block_ids == [3, 2]  # one fresh id, then last freed first
    assert mgr.take_events() == [ev([1], False)]


@pytest.mark.parametrize("policy", MANAGER_POLICIES)
def test_load_pins_in_key_order_and_bad_loads_change_nothing(policy: str) -> None:
    mgr = make_manager(4, policy)
    stored(mgr, [10, 11, 12])
    assert mgr.prepare_load([12, 10]).block_ids == [2, 0]
    assert mgr.stats().pinned == 2
    mgr.prepare_store([13])
    with pytest.raises(BlockNotReadyError, match="13"):
        mgr.prepare_load([11, 13])
    with pytest.raises(BlockNotFoundError, match="99"):
        mgr.prepare_load([11, 99])
    assert mgr.get(11) is not None
    assert mgr.get(11).ref_cnt == 0  # type: ignore[union-attr]
    mgr.complete_load([12, 10])
    mgr.prepare_load([10])
    with pytest.raises(BlockNotPinnedError, match="12"):
        mgr.complete_load([10, 12])  # 12 is not pinned: 10 stays pinned too
    assert mgr.stats().pinned == 1
    mgr.complete_load([10])
    assert mgr.stats().pinned == 0


@pytest.mark.parametrize("policy", LRU_CORES)
def test_bad_input_gets_typed_errors(policy: str) -> None:
    with pytest.raises(ConfigError, match="num_blocks"):
        OffloadingManager(0, block_size=16)
    with pytest.raises(UnknownPolicyError, match="arc, lru, prefix_admit, weighted_lru"):
        OffloadingManager(4, block_size=16, policy="fifo")
    mgr = make_manager(4, policy)
    with pytest.raises(InvalidKeyError, match="str"):
        mgr.prepare_store(["a"])  # type: ignore[list-item]
    with pytest.raises(InvalidKeyError, match="twice"):
        mgr.prepare_store([1, 1])
    assert mgr.stats().used == 0
    with pytest.raises(BlockNotFoundError, match="7"):
        mgr.complete_store([7])


@pytest.mark.parametrize("policy", LRU_CORES)
def test_events_off_records_nothing(policy: str) -> None:
    mgr = make_manager(2, policy)
    stored(mgr, [1, 2])
    stored(mgr, [3])
    assert mgr.take_events() == []


def test_arc_lists_and_target_follow_the_spec() -> None:
    """T1 -> T2 on a second use of a ready block; victims go to the ghost lists;
    a B1 hit grows the target by max(1, |B2|/|B1|)."""
    policy = ARCPolicy(3)
    mgr = make_manager(3, policy)
    stored(mgr, [1, 2, 3])
    mgr.touch([1])  # 1: T1 -> T2
    assert (list(policy.t1), list(policy.t2)) == ([2, 3], [1])
    out = mgr.prepare_store([4])  # |T1|=2 >= int(0): evict T1's oldest
    assert out is not None
    assert out.block_hashes_evicted == [2]
    assert list(policy.b1) == [2]
    mgr.complete_store([4])
    mgr.touch([2])  # ghost hit in B1
    assert policy.target == 1.0
    assert list(policy.b1) == [2]
    mgr.prepare_store([2])  # re-inserted: leaves B1, enters T1; 3 (T1's oldest) leaves
    assert list(policy.t1) == [4, 2]
    assert list(policy.b1) == [3]


@pytest.mark.parametrize("policy", ["arc", "arc-python"])
def test_arc_touch_of_a_block_being_written_moves_it_to_t1s_recent_end(policy: str) -> None:
    """As vLLM's ARC: a touched T1 block still being written stays in T1 but
    becomes its most recent entry, so the untouched one leaves first."""
    mgr = make_manager(3, policy)
    out = mgr.prepare_store([1, 2, 3])
    assert out is not None
    mgr.touch([1])  # not ready: no second use, but now T1's most recent
    mgr.complete_store([1, 2, 3])
    out = mgr.prepare_store([4])
    assert out is not None
    assert out.block_hashes_evicted == [2]
    out = mgr.prepare_store([5])
    assert out is not None
    assert out.block_hashes_evicted == [3]
    assert mgr.lookup([1]) == 1


def test_arc_failed_evict_is_atomic() -> None:
    policy = ARCPolicy(2)
    mgr = make_manager(2, policy)
    stored(mgr, [1, 2])
    mgr.prepare_load([1])
    snapshot = (list(policy.t1), list(policy.t2), list(policy.b1), policy.target)
    assert mgr.prepare_store([3, 4]) is None
    assert (list(policy.t1), list(policy.t2), list(policy.b1), policy.target) == snapshot


@pytest.mark.parametrize("policy", ["weighted_lru", "weighted_lru-python"])
def test_weighted_lru_keeps_frequently_used_blocks(policy: str) -> None:
    """A block touched many times outlives more recent blocks touched once."""
    mgr = make_manager(3, policy)
    stored(mgr, [1, 2, 3])
    for _ in range(5):
        mgr.touch([1])
    mgr.touch([2])
    mgr.touch([3])
    out = mgr.prepare_store([4])
    assert out is not None
    assert out.block_hashes_evicted == [2]
    assert mgr.lookup([1]) == 1


@pytest.mark.parametrize("policy", LRU_CORES)
def test_restore_loads_blocks_found_on_disk(policy: str) -> None:
    mgr = make_manager(4, policy)
    assert mgr.restore([(b"a", 2), (b"b", 0), (b"c", 2), ("bad", 1), (b"d", 9)]) == [b"a", b"b"]
    assert mgr.lookup([b"a", b"b"]) == 2
    out = mgr.prepare_store([b"x", b"y"])
    assert out is not None
    assert out.store_spec.block_ids == [1, 3]
