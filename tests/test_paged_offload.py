"""PagedKVCache: memory pressure, swap out / in, restores and cancellation, checked on the bytes.

The offloader here is an in-memory fake with switches to fail, refuse or hold
a call. Every scenario writes a fingerprint of each token's prefix into its KV
slot (as an engine would write keys and values) and checks, position by
position, that each request reads back exactly its own tokens' fingerprints
after blocks were shared, offloaded, evicted, loaded, copied or moved.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import kvactors
from kvactors.config import Config, GPUConfig, NVMeConfig, TierConfig
from kvactors.errors import (
    BlockNotFoundError,
    ConfigError,
    OutOfBlocksError,
    PagedCacheError,
    TensorSpecError,
    TransferError,
)
from kvactors.keys import Key
from kvactors.paged import (
    Allocation,
    KVCacheConfig,
    Offloader,
    PagedKVCache,
    RequestId,
    SwappedOut,
    hash_blocks,
    root_key,
)

pytestmark = pytest.mark.anyio


class Hits(msgspec.Struct, frozen=True):
    hits: int


class MemoryOffloader:
    """Rows by key in memory, the oldest dropped beyond ``capacity``.

    ``fail_store`` / ``fail_load`` raise TransferError, ``refuse_store`` returns
    ``None``; while ``gate`` is set, store and load wait for it (``entered`` is
    set when one starts waiting). ``calls`` logs ``(operation, number of keys)``.
    """

    def __init__(self, row_bytes: int, capacity: int | None = None) -> None:
        self.row_bytes = row_bytes
        self.capacity = capacity
        self.rows: OrderedDict[Key, torch.Tensor] = OrderedDict()
        self.calls: list[tuple[str, int]] = []
        self.fail_store = self.fail_load = self.refuse_store = False
        self.gate: anyio.Event | None = None
        self.entered = anyio.Event()

    async def _wait(self) -> None:
        await anyio.lowlevel.checkpoint()
        if self.gate is not None:
            self.entered.set()
            await self.gate.wait()

    async def lookup(self, keys: Sequence[Key]) -> Hits:
        self.calls.append(("lookup", len(keys)))
        await anyio.lowlevel.checkpoint()
        hits = 0
        while hits < len(keys) and keys[hits] in self.rows:
            hits += 1
        return Hits(hits)

    async def store(self, keys: Sequence[Key], src: torch.Tensor) -> int | None:
        self.calls.append(("store", len(keys)))
        if src.dtype != torch.uint8 or tuple(src.shape) != (len(keys), self.row_bytes):
            raise TensorSpecError(f"store: got {tuple(src.shape)} {src.dtype}")
        assert len(set(keys)) == len(keys)
        await self._wait()
        if self.fail_store:
            raise TransferError("store: disk full")
        if self.refuse_store:
            return None
        for key, row in zip(keys, src, strict=True):
            self.rows.setdefault(key, row.clone())
        while self.capacity is not None and len(self.rows) > self.capacity:
            self.rows.popitem(last=False)
        return len(keys)

    async def load(self, keys: Sequence[Key], dst: torch.Tensor) -> None:
        self.calls.append(("load", len(keys)))
        assert tuple(dst.shape) == (len(keys), self.row_bytes)
        for key in keys:
            if key not in self.rows:
                raise BlockNotFoundError(f"load: block key {key!r} is not stored")
        await self._wait()
        if self.fail_load:
            raise TransferError("load: read error")
        for i, key in enumerate(keys):
            dst[i] = self.rows[key]


# -- the bytes an engine would write -----------------------------------------------

LAYERS, HEADS, DIM, BS = 2, 1, 2, 4


def make_config(blocks: int = 8, **changes: Any) -> KVCacheConfig:
    fields: dict[str, Any] = {
        "num_layers": LAYERS,
        "num_kv_heads": HEADS,
        "head_dim": DIM,
        "num_gpu_blocks": blocks,
        "block_size": BS,
        "dtype": "float32",
        "watermark": 0.5,
    }
    return KVCacheConfig(**{**fields, **changes})


def fingerprint(tokens: Sequence[int], position: int) -> torch.Tensor:
    """What token ``position`` of ``tokens`` writes: [layers, 2, heads, dim], exact in fp32."""
    digest = hashlib.blake2b(struct.pack(f"<{position + 1}q", *tokens[: position + 1]))
    base = float(int.from_bytes(digest.digest()[:2], "little"))
    return base + torch.arange(LAYERS * 2 * HEADS * DIM).view(LAYERS, 2, HEADS, DIM) / 64


def write(cache: PagedKVCache, rid: RequestId, start: int) -> None:
    """Compute (write) positions ``start..`` of request ``rid``."""
    table = cache.allocator.get_block_table(rid)
    tokens = cache_tokens(cache, rid)
    for p in range(start, len(tokens)):
        value = fingerprint(tokens, p)
        for layer, t in enumerate(cache.kv.layers):
            t[:, table[p // BS], p % BS] = value[layer]


def check(cache: PagedKVCache, rid: RequestId, upto: int | None = None) -> None:
    """Positions ``..upto`` of ``rid`` hold its own tokens' fingerprints."""
    table = cache.allocator.get_block_table(rid)
    tokens = cache_tokens(cache, rid)
    for p in range(len(tokens) if upto is None else upto):
        got = torch.stack([t[:, table[p // BS], p % BS] for t in cache.kv.layers])
        assert torch.equal(got, fingerprint(tokens, p)), f"request {rid!r}, position {p}"


def cache_tokens(cache: PagedKVCache, rid: RequestId) -> list[int]:
    return TOKENS[(id(cache), rid)]


TOKENS: dict[tuple[int, RequestId], list[int]] = {}


async def admit(cache: PagedKVCache, rid: RequestId, tokens: list[int]) -> Allocation:
    """Allocate as an engine does: check what came from the cache, compute the rest."""
    got = await cache.allocate(rid, tokens)
    TOKENS[(id(cache), rid)] = list(tokens)
    check(cache, rid, got.num_cached_tokens)
    write(cache, rid, got.num_cached_tokens)
    return got


async def grow(cache: PagedKVCache, rid: RequestId, new: list[int]) -> None:
    await cache.extend(rid, new)
    tokens = TOKENS[(id(cache), rid)]
    tokens += new
    write(cache, rid, len(tokens) - len(new))


async def bring_back(cache: PagedKVCache, out: SwappedOut) -> Allocation:
    got = await cache.swap_in(out)
    TOKENS[(id(cache), out.request_id)] = list(out.token_ids)
    check(cache, out.request_id, got.num_cached_tokens)
    write(cache, out.request_id, got.num_cached_tokens)
    return got


async def flush(cache: PagedKVCache) -> None:
    """Run and free an unrelated 32-token request: in a pool of 8 blocks of 4
    tokens, every block it had cached is evicted (offloaded first where due)."""
    await admit(cache, "x", toks(32, start=900))
    cache.free("x")


def toks(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def setup(
    blocks: int = 8, capacity: int | None = None, **changes: Any
) -> tuple[PagedKVCache, MemoryOffloader]:
    config = make_config(blocks, **changes)
    store = MemoryOffloader(config.offload_bytes, capacity)
    return PagedKVCache(config, store), store


# -- scenarios --------------------------------------------------------------------


async def test_idle_blocks_are_offloaded_under_pressure_and_a_later_prefix_loads_them() -> None:
    cache, store = setup(blocks=8)  # watermark: 4 blocks empty or clean
    a = cache.allocator
    keys = hash_blocks(root_key(cache.config), toks(20), BS)
    await admit(cache, "a", toks(20))  # blocks 0..4
    cache.free("a")
    assert (a.cached_blocks(), a.empty_blocks()) == ([4, 3, 2, 1, 0], [5, 6, 7])
    assert store.calls == [("lookup", 4)]  # a's first 4 blocks: not stored yet
    store.calls.clear()

    await admit(cache, "b", toks(8, start=100))  # takes 5 6: one empty block left
    # Pressure: the 3 least recently used cached blocks (a's tail) are stored,
    # and stay cached and shareable.
    assert store.calls == [("lookup", 1), ("store", 3)]
    assert list(store.rows) == [keys[4], keys[3], keys[2]]
    assert a.cached_blocks() == [4, 3, 2, 1, 0]
    assert [b for b in range(8) if a.is_clean(b)] == [2, 3, 4]
    store.calls.clear()

    await admit(cache, "c", toks(12, start=200))  # takes 7, then the clean 4 and 3
    # Clean blocks were reused without a store; the next dirty ones were stored.
    assert store.calls == [("lookup", 2), ("store", 2)]
    assert list(store.rows)[3:] == [keys[1], keys[0]]
    store.calls.clear()

    cache.free("b")
    cache.free("c")
    got = await admit(cache, "d", [*toks(20), 7])
    # Blocks 0-2 of a are still in the pool, 3-4 come back from the store; b's and
    # c's blocks make room and are stored (as evicted, then under pressure).
    assert (got.num_cached_tokens, got.num_loaded_tokens) == (20, 8)
    assert store.calls == [("lookup", 2), ("load", 2), ("store", 3), ("store", 2)]
    assert got.block_table.block_ids == [0, 1, 2, 6, 5, 3]
    check(cache, "d")
    stats = cache.stats()
    assert (stats.stored_blocks, stats.loaded_blocks, stats.lookups) == (10, 2, 4)
    assert (stats.allocator.restored_blocks, stats.allocator.hit_blocks) == (2, 3)
    assert stats.allocator.dropped_blocks == 0


async def test_swap_out_then_swap_in_brings_back_every_token() -> None:
    cache, _store = setup(blocks=8)
    await admit(cache, "r", toks(10))
    await grow(cache, "r", toks(3, start=50))  # 13 tokens: 3 full blocks + 1 token
    out = await cache.swap_out("r")
    assert (out.request_id, out.token_ids, out.stored_blocks) == ("r", [*toks(10), 50, 51, 52], 4)
    with pytest.raises(PagedCacheError, match="unknown request 'r'"):
        cache.allocator.get_block_table("r")
    await admit(cache, "other", toks(32, start=500))  # evicts every block r had
    cache.free("other")
    got = await bring_back(cache, out)
    assert (got.num_cached_tokens, got.num_loaded_tokens) == (13, 13)  # the partial block too
    check(cache, "r")
    await grow(cache, "r", [60])
    check(cache, "r")


async def test_swap_in_shares_what_is_still_in_the_pool() -> None:
    cache, store = setup(blocks=8)
    await admit(cache, "r", toks(9))
    out = await cache.swap_out("r")
    assert out.stored_blocks == 3
    got = await bring_back(cache, out)
    assert (got.num_cached_tokens, got.num_loaded_tokens) == (9, 1)  # only the tail loaded
    assert store.calls == [("lookup", 2), ("store", 3), ("lookup", 1), ("load", 1)]
    # Swapping out again stores only the tail: the full blocks are clean.
    out = await cache.swap_out("r")
    assert store.calls[-1] == ("store", 1)


class IntHitsOffloader(MemoryOffloader):
    """The same store, its ``lookup`` answering a plain int (docs/paged.md: "an int
    or a result with ``.hits``"), more than asked for when ``overcount`` is set."""

    overcount = 0

    async def lookup(self, keys: Sequence[Key]) -> int:  # type: ignore[override]
        return (await super().lookup(keys)).hits + self.overcount


@pytest.mark.parametrize("overcount", [0, 5])
async def test_an_offloader_whose_lookup_returns_an_int(overcount: int) -> None:
    config = make_config(8)
    store = IntHitsOffloader(config.offload_bytes)
    store.overcount = overcount  # clamped to the keys asked about
    cache = PagedKVCache(config, store)
    with anyio.fail_after(10):
        await admit(cache, "r", toks(13))  # 3 full blocks + 1 token
        out = await cache.swap_out("r")
        assert out.stored_blocks == 4
        await admit(cache, "other", toks(32, start=500))  # evicts every block r had
        cache.free("other")
        got = await bring_back(cache, out)
    assert (got.num_cached_tokens, got.num_loaded_tokens) == (13, 13)
    check(cache, "r")


async def test_chunks_of_two_blocks() -> None:
    """Offload rows of two blocks: whole chunks and a tail come back bit for bit."""
    config = make_config(8)
    cache, store = setup(8, offload_block_bytes=2 * config.block_size_bytes)
    assert cache.config.blocks_per_offload == 2
    await admit(cache, "r", toks(19))  # blocks 0..4: chunks [0 1] [2 3], tail [4]
    out = await cache.swap_out("r")
    assert (store.calls[-1], out.stored_blocks) == (("store", 3), 3)
    await flush(cache)
    got = await bring_back(cache, out)
    assert (got.num_cached_tokens, got.num_loaded_tokens) == (19, 19)
    # x's blocks are stored as they make room (3 chunks), then pressure stores 1 more.
    assert store.calls[-4:] == [("lookup", 3), ("load", 3), ("store", 3), ("store", 1)]
    check(cache, "r")
    # A prompt ending inside a chunk loads only the block it needs out of its row.
    cache.free("r")
    await admit(cache, "y", toks(32, start=5000))  # evicts everything
    cache.free("y")
    got = await admit(cache, "s", toks(8))
    assert (got.num_cached_tokens, got.num_loaded_tokens) == (4, 4)
    assert store.calls[-4:] == [("lookup", 1), ("load", 1), ("store", 1), ("store", 2)]
    check(cache, "s")


async def test_a_failed_load_leaves_the_tokens_to_compute() -> None:
    cache, store = setup(blocks=8)
    await admit(cache, "a", toks(12))
    out = await cache.swap_out("a")
    await flush(cache)
    store.fail_load = True
    got = await bring_back(cache, out)  # computes all 12 tokens again
    assert (got.num_cached_tokens, got.num_loaded_tokens) == (0, 0)
    assert cache.stats().load_failures == 1
    check(cache, "a")
    cache.free("a")
    store.fail_load = False
    got = await admit(cache, "b", toks(13))  # the recomputed blocks are cached
    assert (got.num_cached_tokens, got.num_loaded_tokens) == (12, 0)


@pytest.mark.parametrize("mode", ["refuse_store", "fail_store"])
async def test_a_store_that_does_not_happen_leaves_blocks_dirty(mode: str) -> None:
    cache, store = setup(blocks=8)
    setattr(store, mode, True)
    await admit(cache, "a", toks(20))
    cache.free("a")
    await admit(cache, "b", toks(8, start=100))
    assert store.calls == [("lookup", 4), ("lookup", 1), ("store", 3)]
    assert store.rows == {}
    assert not any(cache.allocator.is_clean(b) for b in range(8))
    assert cache.stats().store_failures == 1
    setattr(store, mode, False)
    assert await cache.relieve_pressure() == 3  # planned again
    assert len(store.rows) == 3


async def test_cancelled_allocate_releases_its_blocks() -> None:
    cache, store = setup(blocks=8)
    await admit(cache, "a", toks(12))
    out = await cache.swap_out("a")
    await flush(cache)
    free_before = cache.allocator.num_free_blocks()
    store.gate = anyio.Event()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(cache.swap_in, out)
            await store.entered.wait()  # the load is in flight
            tg.cancel_scope.cancel()
    with pytest.raises(PagedCacheError, match="unknown request 'a'"):
        cache.allocator.get_block_table("a")
    assert cache.allocator.num_free_blocks() == free_before
    assert cache.allocator.stats().used == 0
    store.gate = None
    got = await bring_back(cache, out)
    assert got.num_loaded_tokens == 12


async def test_cancelled_swap_out_leaves_the_request_freed() -> None:
    cache, store = setup(blocks=8)
    await admit(cache, "a", toks(12))
    store.gate = anyio.Event()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(cache.swap_out, "a")
            await store.entered.wait()
            tg.cancel_scope.cancel()
    assert cache.allocator.request_ids() == []
    assert not any(cache.allocator.is_clean(b) for b in range(8))
    store.gate = None
    got = await admit(cache, "b", toks(13))
    assert (got.num_cached_tokens, got.num_loaded_tokens) == (12, 0)  # still cached
    # Nothing was left in flight: swapping out stores all of it this time.
    out = await cache.swap_out("b")
    assert (store.calls[-1], out.stored_blocks) == (("store", 4), 4)


async def test_concurrent_requests_for_one_prefix_each_get_right_bytes() -> None:
    cache, store = setup(blocks=16)
    await admit(cache, "a", toks(16))
    await cache.swap_out("a")
    await admit(cache, "x", toks(64, start=900))
    cache.free("x")
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(admit, cache, "b", [*toks(16), 1])
            tg.start_soon(admit, cache, "c", [*toks(16), 2])
    check(cache, "b")
    check(cache, "c")
    assert store.calls.count(("load", 4)) == 2  # neither could share the other's pending blocks
    cache.free("b")
    cache.free("c")
    assert cache.allocator.num_free_blocks() == 16


async def test_defragment_moves_the_bytes_with_the_tables() -> None:
    cache, _ = setup(blocks=12)
    await admit(cache, "a", toks(10, start=300))  # 0 1 2
    await admit(cache, "b", toks(9))  # 3 4 5
    await admit(cache, "c", toks(6, start=600))  # 6 7
    cache.free("a")  # 0 1 cached, 2 empty
    mapping = cache.defragment()
    assert mapping == {7: 2}
    for rid in ("b", "c"):
        check(cache, rid)
    await grow(cache, "c", toks(3))
    check(cache, "c")


async def test_fork_copies_a_shared_partial_block_before_writing() -> None:
    cache, _ = setup(blocks=8)
    await admit(cache, "p", toks(6))
    cache.fork("p", "q")
    TOKENS[(id(cache), "q")] = toks(6)
    await grow(cache, "p", [70])
    await grow(cache, "q", [80, 81, 82])
    check(cache, "p")
    check(cache, "q")
    assert cache.allocator.get_block_table("p")[0] == cache.allocator.get_block_table("q")[0]


async def test_without_an_offloader_evicted_blocks_are_recomputed() -> None:
    cache = PagedKVCache(make_config(8))
    await admit(cache, "a", toks(12))
    out = await cache.swap_out("a")
    assert out.stored_blocks == 0
    got = await bring_back(cache, out)
    assert (got.num_cached_tokens, got.num_loaded_tokens) == (12, 0)  # all still in the pool
    cache.free("a")
    await flush(cache)
    got = await bring_back(cache, out)
    assert (got.num_cached_tokens, got.num_loaded_tokens) == (0, 0)
    check(cache, "a")


async def test_errors_reach_the_caller_and_change_nothing() -> None:
    cache, _store = setup(blocks=4)
    await admit(cache, "a", toks(8))
    with pytest.raises(PagedCacheError, match="request 'a' is already allocated"):
        await cache.allocate("a", [1])
    with pytest.raises(OutOfBlocksError):
        await cache.allocate("b", toks(12, start=50))
    with pytest.raises(PagedCacheError, match="extend: unknown request 'zz'"):
        await cache.extend("zz", [1])
    with pytest.raises(PagedCacheError, match="unknown request 'zz'"):
        await cache.swap_out("zz")
    assert cache.allocator.request_ids() == ["a"]
    check(cache, "a")


@pytest.mark.parametrize("offloading", [True, False])
async def test_swap_out_and_swap_in_errors_name_the_call(offloading: bool) -> None:
    """swap_out of an unknown request said "free: ..." without an offloader and
    "prepare_swap_out: ..." with one; swap_in of anything but a SwappedOut raised
    AttributeError. Both are PagedCacheError naming the call, nothing changed."""
    cache, store = setup(blocks=4)
    if not offloading:
        cache = PagedKVCache(make_config(4))
    await admit(cache, "a", toks(6))
    store.calls.clear()
    before = cache.stats()
    with anyio.fail_after(10):
        with pytest.raises(PagedCacheError, match=r"^swap_out: unknown request 'zz' \("):
            await cache.swap_out("zz")
        for bad in ("a", None, ("a", toks(6), 0)):
            with pytest.raises(
                PagedCacheError,
                match=r"^swap_in: expected the SwappedOut that swap_out returned, got ",
            ):
                await cache.swap_in(bad)  # type: ignore[arg-type]
    assert store.calls == []
    assert cache.stats() == before
    assert cache.allocator.request_ids() == ["a"]
    check(cache, "a")


async def test_a_request_aborted_before_computing_is_freed_uncomputed() -> None:
    """docs/paged.md: free(id, computed=False) drops the blocks the request filled
    instead of caching them; PagedKVCache.free takes it as the allocator does."""
    cache, _store = setup(blocks=8)
    await admit(cache, "a", toks(8))
    cache.free("a")
    got = await cache.allocate("b", toks(13))  # shares a's 2 blocks, fills 2 more
    assert got.num_cached_tokens == 8
    assert cache.free("b", computed=False) == toks(13)
    assert len(cache.allocator.cached_blocks()) == 2  # only a's computed blocks
    again = await cache.allocate("c", toks(13))
    assert again.num_cached_tokens == 8


@pytest.mark.parametrize("offloading", [True, False])
async def test_bad_token_ids_raise_paged_cache_error_and_look_nothing_up(
    offloading: bool,
) -> None:
    """docs/paged.md: token ids that are not a sequence (None, an int), a bad token
    id, no tokens, a request id allocated twice or one too big for the pool raise
    PagedCacheError from PagedKVCache.allocate / swap_in as from the allocator,
    and nothing changed (no lookup either)."""
    cache, store = setup(blocks=4)
    if not offloading:
        cache = PagedKVCache(make_config(4))
    await admit(cache, "a", toks(6))
    cache.free("a")
    store.calls.clear()
    before = cache.stats()
    cases: list[tuple[RequestId, Any, str]] = [
        ("b", None, "token ids must be a sequence of ints, got NoneType"),
        ("b", 5, "token ids must be a sequence of ints, got int"),
        ("b", [*toks(5), True], "token id True is not an int64"),
        ("b", [], "has no tokens"),
        ("b", toks(17), "needs 5 blocks, the pool has 4"),
    ]
    await admit(cache, "a", toks(6))
    cases.append(("a", toks(6), "request 'a' is already allocated"))
    with anyio.fail_after(10):
        for rid, tokens, message in cases:
            with pytest.raises(PagedCacheError, match=message) as info:
                await cache.allocate(rid, tokens)
            assert type(info.value) is PagedCacheError
            with pytest.raises(PagedCacheError, match=message):
                await cache.swap_in(SwappedOut(rid, tokens, 0))
    assert store.calls == []
    assert cache.stats().lookups == before.lookups
    assert cache.allocator.request_ids() == ["a"]
    check(cache, "a")


async def test_through_the_coordinator_with_cpu_and_nvme_tiers(tmp_path: Path) -> None:
    """The coordinator is an offloader: blocks go out to the CPU tier, down to NVMe
    (the CPU tier holds 6 blocks), and come back bit for bit."""
    config = make_config(8)
    tiers = Config(
        block_bytes=config.offload_bytes,
        gpu=GPUConfig(num_blocks=1, device="cpu"),
        cpu=TierConfig(num_blocks=6),
        nvme=NVMeConfig(num_blocks=64, directory=str(tmp_path), backend="posix"),
    )
    with anyio.fail_after(30):
        async with kvactors.open(tiers) as kv:
            cache = PagedKVCache(config, kv)
            await admit(cache, "a", toks(20))
            cache.free("a")
            await admit(cache, "b", toks(8, start=100))  # pressure: a's tail goes out
            out = await cache.swap_out("b")
            await flush(cache)
            got = await admit(cache, "d", [*toks(20), 7])
            assert (got.num_cached_tokens, got.num_loaded_tokens) == (20, 20)
            got = await bring_back(cache, out)
            assert (got.num_cached_tokens, got.num_loaded_tokens) == (8, 8)
            check(cache, "d")
            check(cache, "b")
            stats = await kv.stats()
    assert cache.stats().load_failures == 0
    assert stats.failed_loads == 0
    assert stats.policy.promoted > 0  # some blocks came back up from NVMe


def test_the_fake_is_an_offloader() -> None:
    assert isinstance(MemoryOffloader(8), Offloader)


# -- the state machine on the bytes -------------------------------------------------


class CacheLifecycles(RuleBasedStateMachine):
    """Random engine steps on a small pool with a small, failing store; after every
    step each request reads back exactly its own tokens' fingerprints."""

    def __init__(self) -> None:
        super().__init__()
        config = make_config(10, watermark=0.3)
        self.store = MemoryOffloader(config.offload_bytes, capacity=8)
        self.cache = PagedKVCache(config, self.store)
        self.swapped: list[SwappedOut] = []
        self.next_id = 0

    def running(self) -> list[RequestId]:
        return sorted(self.cache.allocator.request_ids(), key=str)

    @rule(
        prefix=st.sampled_from([toks(9), toks(5, start=40), []]),
        suffix=st.lists(st.integers(0, 2), max_size=8),
    )
    def allocate(self, prefix: list[int], suffix: list[int]) -> None:
        tokens = prefix + suffix
        if not tokens:
            return
        self.next_id += 1
        with contextlib.suppress(OutOfBlocksError):
            anyio.run(admit, self.cache, self.next_id, tokens)

    @precondition(lambda self: self.cache.allocator.request_ids())
    @rule(data=st.data(), new=st.lists(st.integers(0, 2), min_size=1, max_size=5))
    def extend(self, data: st.DataObject, new: list[int]) -> None:
        rid = data.draw(st.sampled_from(self.running()))
        with contextlib.suppress(OutOfBlocksError, PagedCacheError):
            anyio.run(grow, self.cache, rid, new)

    @precondition(lambda self: self.cache.allocator.request_ids())
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(self.running()))
        self.next_id += 1
        self.cache.fork(rid, self.next_id)
        TOKENS[(id(self.cache), self.next_id)] = list(cache_tokens(self.cache, rid))

    @precondition(lambda self: self.cache.allocator.request_ids())
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        self.cache.free(data.draw(st.sampled_from(self.running())))

    @precondition(lambda self: self.cache.allocator.request_ids())
    @rule(data=st.data())
    def swap_out(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(self.running()))
        self.swapped.append(anyio.run(self.cache.swap_out, rid))

    @precondition(lambda self: self.swapped)
    @rule()
    def swap_in(self) -> None:
        try:
            anyio.run(bring_back, self.cache, self.swapped[0])
        except OutOfBlocksError:
            return
        self.swapped.pop(0)

    @rule()
    def defragment(self) -> None:
        self.cache.defragment()

    @rule(fail_load=st.booleans(), refuse_store=st.booleans())
    def weather(self, fail_load: bool, refuse_store: bool) -> None:
        self.store.fail_load = fail_load
        self.store.refuse_store = refuse_store

    @invariant()
    def every_request_reads_its_own_bytes(self) -> None:
        for rid in self.running():
            check(self.cache, rid)
        a = self.cache.allocator
        assert a.num_free_blocks() + a.stats().used == a.num_blocks


TestCacheLifecycles = CacheLifecycles.TestCase
TestCacheLifecycles.settings = settings(
    max_examples=80,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


async def test_a_cache_with_other_block_bytes_is_refused_as_offloader() -> None:
    """docs/paged.md: the coordinator's KVCache block_bytes must equal config.offload_bytes."""
    config = make_config(8)
    tiers = Config(
        block_bytes=2 * config.offload_bytes,
        gpu=GPUConfig(num_blocks=1, device="cpu"),
        cpu=TierConfig(num_blocks=6),
        nvme=None,
    )
    with anyio.fail_after(30):
        async with kvactors.open(tiers) as kv:
            with pytest.raises(ConfigError, match=r"^block_bytes: the offloader's blocks are"):
                PagedKVCache(config, kv)
    with pytest.raises(ConfigError, match=r"^config: expected a KVCacheConfig, got dict"):
        PagedKVCache({"num_layers": 1}, None)  # type: ignore[arg-type]


@pytest.mark.parametrize("offloader", ["kv", object(), "config"])
def test_an_offloader_that_is_not_one_is_refused_when_the_cache_is_made(offloader: object) -> None:
    """PagedKVCache(config, kvactors.Config(...)) (the config, not the opened
    cache) was taken and failed the first allocate with AttributeError ('Config'
    object has no attribute 'lookup'). Now ConfigError naming offloader, with a
    hint for a Config."""
    if offloader == "config":
        offloader = kvactors.Config(
            block_bytes=make_config(4).offload_bytes, cpu=kvactors.TierConfig(num_blocks=4)
        )
    hint = r" \(open it first: async with kvactors.open\(config\) as kv\)$"
    with pytest.raises(
        ConfigError,
        match=r"^offloader: expected an Offloader \(lookup, store and load coroutines, "
        rf"such as the KVCache kvactors.open gives\), got {type(offloader).__name__}"
        + (hint if isinstance(offloader, kvactors.Config) else "$"),
    ):
        PagedKVCache(make_config(4), offloader)  # type: ignore[arg-type]
