"""The block allocator: scenarios, then a state machine over random request lifecycles."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvactors.errors import OutOfBlocksError, PagedCacheError
from kvactors.paged import (
    BlockAllocator,
    MemoryPressure,
    OffloadItem,
    hash_block,
    hash_blocks,
    hash_tail,
)

ROOT = b"root"
BS = 4


def make(num_blocks: int = 8, **kw: object) -> BlockAllocator:
    return BlockAllocator(num_blocks, BS, root=ROOT, **kw)  # type: ignore[arg-type]


def toks(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def state(a: BlockAllocator) -> tuple[object, ...]:
    """Everything observable about the pool, to check that a failed call changed nothing."""
    tables = {rid: a.get_block_table(rid).block_ids for rid in a.request_ids()}
    refs = [a.ref_count(b) for b in range(a.num_blocks)]
    keys = [a.block_key(b) for b in range(a.num_blocks)]
    return tables, refs, keys, a.cached_blocks(), a.empty_blocks(), a.stats()


# -- allocate / extend / free -----------------------------------------------------


def test_allocate_takes_the_lowest_empty_blocks() -> None:
    a = make()
    plan = a.allocate("r1", toks(10))
    assert plan.block_table.block_ids == [0, 1, 2]
    assert (plan.num_cached_tokens, plan.num_shared_tokens) == (0, 0)
    assert (plan.restore_keys, plan.evicted) == ([], [])
    assert a.num_free_blocks() == 5
    assert a.usage() == 3 / 8
    keys = hash_blocks(ROOT, toks(10), BS)
    assert [a.block_key(b) for b in (0, 1, 2)] == [keys[0], keys[1], None]  # partial: no key
    assert a.can_allocate(20)
    assert not a.can_allocate(21)


def test_a_shared_prefix_is_shared_not_copied() -> None:
    """Two requests with the same first 8 tokens share 2 blocks; tails stay private."""
    a = make()
    a.allocate("r1", toks(10))
    plan = a.allocate("r2", [*toks(8), 50, 51, 52])
    assert plan.block_table.block_ids == [0, 1, 3]
    assert (plan.num_cached_tokens, plan.num_shared_tokens) == (8, 8)
    assert [a.ref_count(b) for b in range(4)] == [2, 2, 1, 1]
    assert a.num_free_blocks() == 4
    assert a.stats().hit_blocks == 2


def test_the_last_token_is_never_served_from_the_cache() -> None:
    """An 8-token prompt equal to a cached one shares only block 0: the engine must
    compute token 7 to get its logits, into a private block."""
    a = make()
    a.allocate("r1", toks(8))
    plan = a.allocate("r2", toks(8))
    assert plan.block_table.block_ids == [0, 2]
    assert plan.num_cached_tokens == 4
    assert a.block_key(2) is None  # same tokens as block 1, which keeps the key


def test_a_shared_block_is_released_by_its_last_user() -> None:
    a = make()
    a.allocate("r1", toks(10))
    a.allocate("r2", [*toks(8), 50])
    assert a.free("r1") == toks(10)
    assert [a.ref_count(b) for b in range(4)] == [1, 1, 0, 1]
    assert a.empty_blocks() == [2, 4, 5, 6, 7]  # r1's partial block: nothing to keep
    a.free("r2")
    # Full blocks stay cached, the tail least recently used (reused first).
    assert a.cached_blocks() == [1, 0]
    assert a.empty_blocks() == [2, 3, 4, 5, 6, 7]
    assert a.num_free_blocks() == 8
    assert a.usage() == 0.0


def test_cached_blocks_serve_a_later_request_until_their_slot_is_needed() -> None:
    a = make(num_blocks=4)
    a.allocate("r1", toks(9))
    a.free("r1")
    plan = a.allocate("r2", toks(9))
    assert plan.block_table.block_ids == [0, 1, 2]
    assert plan.num_cached_tokens == 8
    a.free("r2")
    # A request with other tokens needs 4 blocks: 2 empty, then the LRU cached ones.
    plan = a.allocate("r3", toks(13, start=100))
    assert plan.block_table.block_ids == [2, 3, 1, 0]
    assert a.stats().evicted_blocks == 2
    assert a.stats().dropped_blocks == 2
    assert a.match(toks(9)).num_resident_tokens == 0


def test_extend_adds_blocks_and_keys_as_blocks_fill() -> None:
    a = make()
    a.allocate("r1", toks(3))
    assert a.extend("r1", [3]).copies == []
    table = a.get_block_table("r1")
    assert table.block_ids == [0]
    assert table.num_tokens == 4
    assert a.block_key(0) == hash_block(ROOT, toks(4))
    a.extend("r1", toks(5, start=4))
    assert table.block_ids == [0, 1, 2]  # the table is live
    assert a.block_key(1) == hash_block(hash_block(ROOT, toks(4)), toks(4, start=4))
    assert a.extend("r1", []) == a.extend("r1", [])  # nothing to do
    assert table.num_tokens == 9


def test_failures_change_nothing() -> None:
    a = make(num_blocks=5)
    a.allocate("r0", [5])
    a.allocate("r1", toks(9))
    before = state(a)
    with pytest.raises(OutOfBlocksError, match="'r2' needs 2 new blocks, 1 are free"):
        a.allocate("r2", toks(5, start=50))
    with pytest.raises(OutOfBlocksError, match="'r1' needs 2 new blocks, 1 are free"):
        a.extend("r1", toks(8))
    assert state(a) == before
    a.allocate("r2", [7])
    assert a.get_block_table("r2").block_ids == [4]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda a: a.allocate("r1", toks(2)), "allocate: request 'r1' is already allocated"),
        (lambda a: a.allocate("big", toks(33)), "'big' needs 9 blocks, the pool has 8 in all"),
        (lambda a: a.allocate("r9", []), "allocate: request 'r9' has no tokens"),
        (lambda a: a.allocate("r9", [1, 2.5]), "allocate: token id 2.5 is not an int64"),
        (lambda a: a.extend("nope", [1]), "extend: unknown request 'nope'"),
        (lambda a: a.extend("r1", toks(30)), "extend: request 'r1' needs 9 blocks"),
        (lambda a: a.extend("r1", ["x"]), "extend: token id 'x' is not an int64"),
        (lambda a: a.allocate("r9", [True]), "allocate: token id True is not an int64"),
        (lambda a: a.allocate("r9", [3, False, 1]), "allocate: token id False is not an int64"),
        (lambda a: a.allocate("r9", [*toks(9), True]), "allocate: token id True is not an int64"),
        (lambda a: a.extend("r1", [True]), "extend: token id True is not an int64"),
        (lambda a: a.extend("r1", [1, True]), "extend: token id True is not an int64"),
        (lambda a: a.match([1, True, 2]), "match: token id True is not an int64"),
        (lambda a: a.allocate("r9", None), "allocate: token ids must be a sequence of ints"),
        (lambda a: a.extend("r1", 5), "extend: token ids must be a sequence of ints, got int"),
        (lambda a: a.match(None), "match: token ids must be a sequence of ints"),
        (
            lambda a: a.allocate("r9", {1, 2}),
            "allocate: token ids must be a sequence of ints, got set",
        ),
        (
            lambda a: a.allocate("r9", {1: 2}),
            "allocate: token ids must be a sequence of ints, got dict",
        ),
        (lambda a: a.allocate("r9", iter([1])), "sequence of ints, got list_iterator"),
        (lambda a: a.extend("r1", (t for t in [1])), "sequence of ints, got generator"),
        (lambda a: a.match(frozenset([1])), "match: token ids must be a sequence of ints"),
        (lambda a: a.free("nope"), "free: unknown request 'nope'"),
        (lambda a: a.fork("nope", "c"), "fork: unknown request 'nope'"),
        (lambda a: a.fork("r1", "r1"), "fork: request 'r1' is already allocated"),
        (lambda a: a.get_block_table(7), "get_block_table: unknown request 7"),
        (lambda a: a.complete_restore("r1", True), "'r1' has no restore in flight"),
        (lambda a: a.can_allocate(-1), "num_tokens must be an int >= 0"),
        (lambda a: a.ref_count(8), r"block id 8 is out of range 0\.\.7"),
        (lambda a: a.block_key(-1), r"block id -1 is out of range 0\.\.7"),
        # offloaded that is not a collection of keys raised TypeError part way.
        (lambda a: a.allocate("r9", toks(8), offloaded=5), "allocate: offloaded must be a"),
        (lambda a: a.allocate("r9", toks(8), offloaded="k"), "offload keys .bytes., got str"),
        (lambda a: a.allocate("r9", toks(8), offloaded=[[1]]), "offload keys .bytes., got list"),
        # An unhashable request id raised TypeError from the request map.
        (lambda a: a.allocate(["r9"], [1]), "allocate: a request id must be hashable"),
        (lambda a: a.extend(["r1"], [1]), "extend: a request id must be hashable .*got list"),
        (lambda a: a.free({}), "free: a request id must be hashable .*got dict"),
        (lambda a: a.fork("r1", ["c"]), "fork: a request id must be hashable"),
        (lambda a: a.fork(["r1"], "c"), "fork: a request id must be hashable"),
        (lambda a: a.get_block_table([7]), "get_block_table: a request id must be hashable"),
    ],
)
def test_bad_input_gets_a_typed_error(call: object, message: str) -> None:
    """Never an OutOfBlocksError for a request that can never fit: that is not transient."""
    a = make()
    a.allocate("r1", toks(6))
    before = state(a)
    with pytest.raises(PagedCacheError, match=message) as info:
        call(a)  # type: ignore[operator]
    assert type(info.value) is PagedCacheError
    assert state(a) == before


def test_token_ids_in_other_sequence_types_are_taken_in_order() -> None:
    """Tuples, ranges and numpy / torch integer arrays are sequences of int64 token
    ids: they share blocks with the same ids in a list, and the request keeps them
    as ints."""
    a = make()
    kinds = [
        tuple(toks(6)),
        range(6),
        np.arange(6, dtype=np.int64),
        np.arange(6, dtype=np.int32),
        torch.arange(6),
        torch.arange(6, dtype=torch.int32),
        toks(6),
    ]
    for rid, tokens in enumerate(kinds):
        plan = a.allocate(rid, tokens)  # type: ignore[arg-type]
        assert plan.num_shared_tokens == (0 if rid == 0 else 4)
        assert a.extend(rid, np.array([6], dtype=np.int64)).copies == []  # type: ignore[arg-type]
        back = a.free(rid)
        assert back == toks(7)
        assert {type(t) for t in back} == {int}
    assert hash_block(ROOT, torch.arange(4)) == hash_block(ROOT, toks(4))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "tokens",
    [
        torch.arange(6.0),
        torch.tensor([1, 0, 1], dtype=torch.bool),
        np.array([True, False]),
        [1, np.float32(2.0)],
        np.array([2**64 - 1], dtype=np.uint64),
        torch.zeros(2, 2, dtype=torch.int64),
    ],
)
def test_float_and_bool_array_elements_are_not_token_ids(tokens: object) -> None:
    """docs/paged.md: a token id that is not an int64 (True is not one) raises
    PagedCacheError, whatever holds it."""
    a = make()
    a.allocate("r1", toks(6))
    before = state(a)
    for call in (
        lambda: a.allocate("r2", tokens),  # type: ignore[arg-type]
        lambda: a.extend("r1", tokens),  # type: ignore[arg-type]
        lambda: a.match(tokens),  # type: ignore[arg-type]
    ):
        with pytest.raises(PagedCacheError, match="is not an int64") as info:
            call()
        assert type(info.value) is PagedCacheError
    assert state(a) == before


def test_a_block_table_is_dead_after_free() -> None:
    a = make()
    old = a.allocate("r1", toks(5)).block_table
    a.free("r1")
    for use in (lambda: old.block_ids, lambda: len(old), lambda: old[0], lambda: list(old)):
        with pytest.raises(PagedCacheError, match="request 'r1' used after the request was freed"):
            use()
    with pytest.raises(PagedCacheError, match="free: unknown request 'r1'"):
        a.free("r1")
    new = a.allocate("r1", toks(5)).block_table  # the id may be reused
    assert new.block_ids == [0, 1]  # block 0 from the cache
    with pytest.raises(PagedCacheError):
        old.block_ids  # noqa: B018


# -- fork, copy-on-write, defragment ----------------------------------------------


def test_fork_shares_every_block_and_copies_a_shared_partial_block_on_write() -> None:
    a = make()
    a.allocate("p", toks(6))
    child = a.fork("p", "c")
    assert child.block_ids == [0, 1]
    assert child.num_tokens == 6
    assert [a.ref_count(b) for b in (0, 1)] == [2, 2]
    plan = a.extend("p", [60])
    assert plan.copies == [(1, 2)]  # the parent writes into a copy of block 1
    assert a.get_block_table("p").block_ids == [0, 2]
    assert [a.ref_count(b) for b in (0, 1, 2)] == [2, 1, 1]
    assert a.extend("c", [70]).copies == []  # block 1 is the child's alone now
    assert child.block_ids == [0, 1]
    a.extend("c", [71, 72])  # fills block 1 and opens block 3
    assert child.block_ids == [0, 1, 3]
    assert a.block_key(1) == hash_blocks(ROOT, [*toks(6), 70, 71], BS)[1]
    a.free("p")
    a.free("c")
    assert a.num_free_blocks() == 8


def test_defragment_moves_live_blocks_down_and_rewrites_every_table() -> None:
    a = make(num_blocks=10)
    a.allocate("x", toks(9, start=100))  # blocks 0 1 2
    a.allocate("y", toks(10))  # 3 4 5
    a.allocate("z", toks(5, start=200))  # 6 7
    a.fork("y", "y2")
    a.free("x")  # 0, 1 cached; 2 empty
    a.free("z")  # 6 cached; 7 empty
    key6 = a.block_key(6)
    assert a.empty_blocks() == [2, 7, 8, 9]
    mapping = a.defragment()
    assert mapping == {6: 2}
    assert a.get_block_table("y").block_ids == [3, 4, 5]
    assert a.empty_blocks() == [6, 7, 8, 9]
    assert a.block_key(2) == key6
    assert a.block_key(6) is None
    assert a.cached_blocks() == [1, 0, 2]  # LRU order kept: x freed before z
    assert a.match(toks(5, start=200)).num_resident_tokens == 4  # still found, at block 2
    a.free("y")
    a.free("y2")
    assert a.empty_blocks() == [5, 6, 7, 8, 9]  # y's partial block 5 held no key
    a.allocate("w", [1])
    assert a.get_block_table("w").block_ids == [5]
    assert a.defragment() == {}


def test_defragment_of_referenced_blocks() -> None:
    a = make(num_blocks=6)
    a.allocate("a", toks(4))  # 0
    a.allocate("b", toks(6, start=50))  # 1 2
    a.allocate("c", toks(2, start=90))  # 3
    a.free("b", computed=False)  # 1 2 empty (never computed: not cached)
    mapping = a.defragment()
    assert mapping == {3: 1}
    assert a.get_block_table("c").block_ids == [1]
    assert [a.ref_count(b) for b in range(6)] == [1, 1, 0, 0, 0, 0]


# -- memory pressure and offload plans ---------------------------------------------


def test_pressure_callbacks_run_below_the_watermark() -> None:
    a = make(num_blocks=8, watermark_blocks=3)
    seen: list[MemoryPressure] = []
    a.add_pressure_callback(seen.append)
    a.allocate("r1", toks(16))  # 4 empty left
    assert seen == []
    assert not a.under_pressure()
    a.allocate("r2", toks(8, start=50))  # 2 empty left
    assert seen == [MemoryPressure(num_empty=2, num_clean=0, num_cached=0, watermark=3)]
    a.extend("r2", [1])
    assert seen[-1] == MemoryPressure(1, 0, 0, 3)
    a.extend("r2", [2])  # into the last block: takes nothing, so no event
    assert len(seen) == 2
    a.remove_pressure_callback(seen.append)
    a.extend("r2", toks(3))  # takes block 7
    assert len(seen) == 2
    assert a.stats().pressure_events == 3


def test_a_clean_block_a_request_holds_does_not_count_against_pressure() -> None:
    """docs/paged.md: pressure counts empty blocks and cached clean ones only."""
    a = make(num_blocks=4, watermark_blocks=2, offloading=True)
    a.allocate("r1", toks(9))
    items = a.prepare_swap_out("r1")  # stored while r1 still holds its blocks
    a.complete_offload(items, True)
    assert a.is_clean(a.get_block_table("r1")[0])
    assert (a.stats().empty, a.stats().clean) == (1, 0)
    assert a.under_pressure()
    a.free("r1")
    assert (a.stats().empty, a.stats().clean) == (2, 2)  # the partial block is empty
    assert not a.under_pressure()


def test_an_allocation_that_takes_no_block_runs_no_pressure_callback() -> None:
    """docs/paged.md: callbacks run after an allocate that *takes blocks*; a swap-in
    (compute_last=False) of blocks other requests hold takes none."""
    a = make(num_blocks=4, watermark_blocks=4)
    seen: list[MemoryPressure] = []
    a.add_pressure_callback(seen.append)
    a.allocate("r1", toks(8))
    assert len(seen) == 1
    plan = a.allocate("r2", toks(8), compute_last=False)  # both blocks shared, held by r1
    assert plan.num_shared_tokens == 8
    assert len(seen) == 1
    assert a.stats().pressure_events == 1
    a.free("r1")
    a.free("r2")  # both blocks cached now
    a.allocate("r3", toks(8), compute_last=False)  # takes the two cached blocks
    assert len(seen) == 2


def test_under_pressure_the_lru_cached_blocks_are_planned_for_offload() -> None:
    a = make(num_blocks=8, watermark_blocks=4, offloading=True)
    a.allocate("r1", toks(12))  # 0 1 2
    a.allocate("r2", toks(12, start=50))  # 3 4 5
    a.free("r1")
    a.free("r2")  # cached, least recent first: 2 1 0 5 4 3
    assert a.empty_blocks() == [6, 7]
    assert a.under_pressure()
    k1 = hash_blocks(ROOT, toks(12), BS)
    items = a.prepare_offload()
    assert [(i.key, i.block_ids, i.hashes) for i in items] == [
        (k1[2], [2], [k1[2]]),
        (k1[1], [1], [k1[1]]),
    ]
    assert a.prepare_offload() == []  # still under pressure, but those are in flight
    a.complete_offload(items, True)
    assert [a.is_clean(b) for b in range(4)] == [False, True, True, False]
    assert not a.under_pressure()
    assert a.stats().clean == 2
    assert a.prepare_offload() == []


def test_a_failed_offload_can_be_planned_again() -> None:
    a = make(num_blocks=4, watermark_blocks=4, offloading=True)
    a.allocate("r1", toks(4))
    a.free("r1")
    items = a.prepare_offload()
    assert [i.block_ids for i in items] == [[0]]
    a.complete_offload(items, False)
    assert not a.is_clean(0)
    assert a.prepare_offload() == items


def test_dirty_evicted_blocks_are_handed_back_for_offload_clean_ones_are_not() -> None:
    a = make(num_blocks=4, watermark_blocks=1, offloading=True)
    a.allocate("r1", toks(16))
    a.free("r1")  # cached: 3 2 1 0
    keys = hash_blocks(ROOT, toks(16), BS)
    items = a.prepare_offload()
    assert [i.block_ids for i in items] == [[3]]
    a.complete_offload(items, True)
    plan = a.allocate("r2", toks(8, start=50))
    assert plan.block_table.block_ids == [3, 2]
    assert [(i.key, i.block_ids) for i in plan.evicted] == [(keys[2], [2])]  # 3 was clean
    assert a.stats().dropped_blocks == 0


def test_chunks_of_two_blocks_are_offloaded_whole() -> None:
    a = make(num_blocks=8, watermark_blocks=8, blocks_per_offload=2, offloading=True)
    a.allocate("r1", toks(16))
    a.free("r1")  # cached: 3 2 1 0
    keys = hash_blocks(ROOT, toks(16), BS)
    items = a.prepare_offload()
    assert [(i.key, i.block_ids) for i in items] == [(keys[3], [2, 3]), (keys[1], [0, 1])]
    a.complete_offload(items, True)
    assert all(a.is_clean(b) for b in range(4))


def test_swap_out_plans_whole_chunks_and_the_tail() -> None:
    a = make(num_blocks=8, blocks_per_offload=2, offloading=True)
    a.allocate("r1", toks(14))  # blocks 0..3, chunk [0 1], tail [2 3] (3 is partial)
    keys = hash_blocks(ROOT, toks(14), BS)
    items = a.prepare_swap_out("r1")
    assert [(i.key, i.block_ids, i.hashes) for i in items] == [
        (keys[1], [0, 1], [keys[0], keys[1]]),
        (hash_tail(keys[1], toks(6, start=8)), [2, 3], [keys[2], None]),
    ]
    a.free("r1")
    a.complete_offload(items, True)
    assert [a.is_clean(b) for b in range(4)] == [True, True, True, False]
    # Brought back: the pool still has the full blocks, the tail is restored.
    match = a.match(toks(14), compute_last=False)
    assert match.num_resident_tokens == 12
    assert match.lookup_keys == [items[1].key]
    plan = a.allocate("r1", toks(14), offloaded={items[1].key}, compute_last=False)
    assert plan.block_table.block_ids == [0, 1, 2, 3]
    assert (plan.num_cached_tokens, plan.num_shared_tokens) == (14, 12)
    assert plan.restore_keys == [items[1].key]
    targets = a.complete_restore("r1", True)
    assert (targets.rows, targets.block_ids) == ([1], [3])  # the tail's second block


def test_a_restore_is_planned_from_the_first_block_not_in_the_pool() -> None:
    a = make(num_blocks=8, offloading=True)
    keys = hash_blocks(ROOT, toks(13), BS)
    assert a.match(toks(13)).lookup_keys == keys  # blocks 0..2 may be restored
    plan = a.allocate("r1", toks(13), offloaded={keys[0], keys[2]})
    assert plan.restore_keys == [keys[0]]  # block 1 is missing: the run stops there
    assert plan.num_cached_tokens == 4
    with pytest.raises(PagedCacheError, match="extend: request 'r1' has a restore in flight"):
        a.extend("r1", [1])
    with pytest.raises(PagedCacheError, match="free: request 'r1' has a restore in flight"):
        a.free("r1")
    assert a.block_key(0) is None  # not shareable before its bytes arrived
    assert a.get_block_table("r1").block_ids == [0, 1, 2, 3]
    assert a.block_key(1) == keys[1]  # computed by the engine: registered at once
    targets = a.complete_restore("r1", True)
    assert (targets.rows, targets.block_ids) == ([0], [0])
    assert a.block_key(0) == keys[0]
    assert a.is_clean(0)
    assert a.stats().restored_blocks == 1


def test_no_restore_when_the_blocks_a_chunk_could_give_are_in_the_pool() -> None:
    """k=2: block 0 is shared and block 1 holds the last token (computed): the
    chunk's row has nothing to give, so it is neither looked up nor loaded."""
    a = make(num_blocks=8, blocks_per_offload=2, offloading=True)
    a.allocate("r1", toks(8))
    items = a.prepare_swap_out("r1")
    a.free("r1")
    a.complete_offload(items, True)
    assert a.match(toks(8)).lookup_keys == []
    plan = a.allocate("r2", toks(8), offloaded={items[0].key})
    assert (plan.restore_keys, plan.num_cached_tokens) == ([], 4)
    assert a.get_block_table("r2").block_ids == [0, 2]


def test_a_failed_restore_leaves_the_blocks_to_compute() -> None:
    a = make(num_blocks=8, offloading=True)
    keys = hash_blocks(ROOT, toks(13), BS)
    plan = a.allocate("r1", toks(13), offloaded=set(keys))
    assert plan.restore_keys == keys
    assert plan.num_cached_tokens == 12
    targets = a.complete_restore("r1", False)
    assert (targets.rows, targets.block_ids) == ([0, 1, 2], [0, 1, 2])
    assert not any(a.is_clean(b) for b in range(3))
    assert a.stats().restored_blocks == 0
    # Computed by the engine like new blocks, so cached when freed.
    a.free("r1")
    assert a.cached_blocks() == [2, 1, 0]


def test_free_of_an_uncomputed_request_keeps_only_what_it_got_from_the_cache() -> None:
    a = make()
    a.allocate("r1", toks(9))
    a.free("r1")
    a.allocate("r2", toks(13))  # shares 0 1, fills 3 (block 2 was r1's partial: empty)
    a.free("r2", computed=False)
    assert a.cached_blocks() == [1, 0]
    assert a.block_key(3) is None


# -- the state machine ------------------------------------------------------------

PREFIXES = [toks(9, start=1000), toks(6, start=2000), []]


class Lifecycles(RuleBasedStateMachine):
    """Random allocate / extend / fork / free / defragment / offload / restore.

    Invariants after every step: every block is exactly one of empty, cached or
    referenced; ref counts equal the number of tables holding each block; no
    table holds a block twice; free + used = total; registered keys are unique
    and equal the hash of the tokens of every table that holds the block.
    """

    K = 1  # blocks per offload block

    def __init__(self) -> None:
        super().__init__()
        self.a = BlockAllocator(
            12, BS, blocks_per_offload=self.K, watermark_blocks=4, offloading=True, root=ROOT
        )
        self.tokens: dict[int, list[int]] = {}
        self.stored: set[bytes] = set()
        self.next_id = 0

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _store(self, items: list[OffloadItem]) -> None:
        """Evicted blocks: stored (they were copied out before the caller wrote)."""
        for item in items:
            assert self.a.block_key(item.block_ids[-1]) != item.key  # left the pool
        self.a.complete_offload(items, True)
        self.stored.update(item.key for item in items)

    @rule()
    def flush(self) -> None:
        """Another request takes every free block: the cache empties into the store."""
        n = self.a.num_free_blocks()
        if n:
            self.next_id += 1
            plan = self.a.allocate("flush", toks(n * BS, start=10_000 * self.next_id))
            self._store(plan.evicted)
            self.a.free("flush", computed=False)
            assert self.a.cached_blocks() == []

    @rule(
        prefix=st.sampled_from(PREFIXES),
        suffix=st.lists(st.integers(0, 3), max_size=10),
        compute_last=st.booleans(),
        restore_ok=st.booleans(),
    )
    def allocate(
        self, prefix: list[int], suffix: list[int], compute_last: bool, restore_ok: bool
    ) -> None:
        tokens = prefix + suffix
        rid = self._new_id()
        before = state(self.a)
        try:
            plan = self.a.allocate(rid, tokens, offloaded=self.stored, compute_last=compute_last)
        except OutOfBlocksError:
            assert state(self.a) == before
            return
        except PagedCacheError:
            assert not tokens or -(-len(tokens) // BS) > 12
            assert state(self.a) == before
            return
        self._store(plan.evicted)
        assert len(plan.block_table) == -(-len(tokens) // BS)
        assert plan.num_shared_tokens <= plan.num_cached_tokens <= len(tokens)
        if compute_last:
            assert plan.num_cached_tokens < len(tokens)
        if plan.restore_keys:
            assert set(plan.restore_keys) <= self.stored
            targets = self.a.complete_restore(rid, restore_ok)
            assert len(targets.rows) == len(targets.block_ids)
            assert max(targets.rows) < len(plan.restore_keys) * self.K
        self.tokens[rid] = tokens

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), new=st.lists(st.integers(0, 3), max_size=6))
    def extend(self, data: st.DataObject, new: list[int]) -> None:
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        before = state(self.a)
        tokens = self.tokens[rid]
        ids = self.a.get_block_table(rid).block_ids
        total = -(-(len(tokens) + len(new)) // BS)
        cow = bool(new) and len(tokens) % BS != 0 and self.a.ref_count(ids[-1]) > 1
        if total > 12 or total - len(ids) + cow > self.a.num_free_blocks():
            error = PagedCacheError if total > 12 else OutOfBlocksError
            with pytest.raises(error) as info:
                self.a.extend(rid, new)
            assert type(info.value) is error
            assert state(self.a) == before
            return
        plan = self.a.extend(rid, new)
        assert len(plan.copies) == cow
        self._store(plan.evicted)
        for src, dst in plan.copies:
            assert self.a.ref_count(src) >= 1
            assert self.a.ref_count(dst) == 1
        self.tokens[rid] += new

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        child = self._new_id()
        self.a.fork(rid, child)
        self.tokens[child] = list(self.tokens[rid])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), computed=st.booleans())
    def free(self, data: st.DataObject, computed: bool) -> None:
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        table = self.a.get_block_table(rid)
        assert self.a.free(rid, computed=computed) == self.tokens.pop(rid)
        with pytest.raises(PagedCacheError):
            table.block_ids  # noqa: B018

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), success=st.booleans())
    def swap_out(self, data: st.DataObject, success: bool) -> None:
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        items = self.a.prepare_swap_out(rid)
        self.a.free(rid)
        del self.tokens[rid]
        self.a.complete_offload(items, success)
        if success:
            self.stored.update(item.key for item in items)

    @rule(success=st.booleans())
    def relieve_pressure(self, success: bool) -> None:
        items = self.a.prepare_offload()
        for item in items:
            assert len(item.block_ids) == self.K
            assert all(self.a.ref_count(b) == 0 for b in item.block_ids[-1:])
        self.a.complete_offload(items, success)
        if success:
            self.stored.update(item.key for item in items)

    @rule()
    def defragment(self) -> None:
        tables = {rid: self.a.get_block_table(rid).block_ids for rid in self.tokens}
        mapping = self.a.defragment()
        live = self.a.num_blocks - len(self.a.empty_blocks())
        assert self.a.empty_blocks() == list(range(live, self.a.num_blocks))
        assert all(old >= live > new for old, new in mapping.items())
        for rid, ids in tables.items():
            assert self.a.get_block_table(rid).block_ids == [mapping.get(b, b) for b in ids]

    @invariant()
    def every_block_is_in_exactly_one_place(self) -> None:
        a = self.a
        held = Counter(b for rid in self.tokens for b in a.get_block_table(rid).block_ids)
        for rid in self.tokens:
            ids = a.get_block_table(rid).block_ids
            assert len(set(ids)) == len(ids)
        referenced = {b for b in range(a.num_blocks) if a.ref_count(b)}
        empty, cached = a.empty_blocks(), a.cached_blocks()
        assert len(set(empty)) == len(empty)
        assert len(set(cached)) == len(cached)
        assert not (set(empty) & set(cached))
        assert not (referenced & (set(empty) | set(cached)))
        assert referenced | set(empty) | set(cached) == set(range(a.num_blocks))
        assert all(a.ref_count(b) == held[b] for b in range(a.num_blocks))
        used = len(referenced)
        assert a.num_free_blocks() + used == a.num_blocks
        stats = a.stats()
        assert (stats.used, stats.cached, stats.empty) == (used, len(cached), len(empty))
        assert stats.clean == sum(a.is_clean(b) for b in cached)

    @invariant()
    def keys_match_tokens(self) -> None:
        a = self.a
        keys = [a.block_key(b) for b in range(a.num_blocks)]
        registered = [k for k in keys if k is not None]
        assert len(set(registered)) == len(registered)
        assert all(keys[b] is not None for b in a.cached_blocks())
        for rid, tokens in self.tokens.items():
            ids = a.get_block_table(rid).block_ids
            assert len(ids) == -(-len(tokens) // BS)
            for i, key in enumerate(hash_blocks(ROOT, tokens, BS)):
                assert keys[ids[i]] in (key, None)
            if len(tokens) % BS:
                assert keys[ids[-1]] is None


class ChunkLifecycles(Lifecycles):
    """The same with two blocks per offload block (chunks and tails)."""

    K = 2


MACHINE_SETTINGS = settings(
    max_examples=250,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLifecycles = Lifecycles.TestCase
TestLifecycles.settings = MACHINE_SETTINGS
TestChunkLifecycles = ChunkLifecycles.TestCase
TestChunkLifecycles.settings = MACHINE_SETTINGS


def test_a_pressure_callback_is_checked_when_added_and_its_error_leaves_the_call_done() -> None:
    """add_pressure_callback(None) was taken and made the first allocate under
    pressure raise TypeError (after the request was allocated); removing a
    callback never added raised ValueError. A callback's own exception reaches
    the caller, and the allocation it follows stands."""
    a = make(num_blocks=8, watermark_blocks=3)
    with pytest.raises(PagedCacheError, match=r"^add_pressure_callback: expected a callable, got "):
        a.add_pressure_callback(None)  # type: ignore[arg-type]
    with pytest.raises(PagedCacheError, match=r"^remove_pressure_callback: .* is not a pressure"):
        a.remove_pressure_callback(print)  # type: ignore[arg-type]
    a.allocate("r1", toks(24))  # 2 empty left: under pressure, no callback to run
    assert a.stats().pressure_events == 1

    seen: list[MemoryPressure] = []

    def refuse(event: MemoryPressure) -> None:
        raise RuntimeError(f"pressure: {event.num_empty} empty")

    a.add_pressure_callback(refuse)
    a.add_pressure_callback(seen.append)
    with pytest.raises(RuntimeError, match=r"^pressure: 1 empty$"):
        a.allocate("r2", toks(2, start=90))
    assert a.get_block_table("r2").block_ids == [6]  # the allocation stands
    assert seen == []  # the callback after the raising one skipped that event
    a.remove_pressure_callback(refuse)
    a.extend("r2", toks(3, start=95))  # takes block 7
    assert seen == [MemoryPressure(0, 0, 0, 3)]


def test_completions_take_a_bool_and_the_plans_items_only() -> None:
    """complete_offload / complete_restore counted any success by its truth (a
    list [False] as a success, None as a failure) and complete_offload(None, ...)
    raised TypeError. Now PagedCacheError, nothing changed; numpy and torch bool
    scalars are bools."""
    import numpy as np

    a = make(num_blocks=8, offloading=True)
    a.allocate("r1", toks(9))
    items = a.prepare_swap_out("r1")
    before = state(a)
    for bad in ([False], None, 1, np.array([True])):
        with pytest.raises(PagedCacheError, match=r"^complete_offload: success must be a bool"):
            a.complete_offload(items, bad)  # type: ignore[arg-type]
    for bad_items in (None, items[0], [1]):
        with pytest.raises(PagedCacheError, match=r"^complete_offload: items must be the Off"):
            a.complete_offload(bad_items, True)  # type: ignore[arg-type]
    assert state(a) == before
    a.complete_offload(items, np.bool_(True))
    assert a.is_clean(a.get_block_table("r1")[0])
    other = make(num_blocks=8, offloading=True)
    plan = other.allocate("r2", toks(9), offloaded={item.key for item in items})
    assert plan.restore_keys
    with pytest.raises(PagedCacheError, match=r"^complete_restore: success must be a bool"):
        other.complete_restore("r2", [True])  # type: ignore[arg-type]
    other.complete_restore("r2", True)  # still in flight after the refusal
