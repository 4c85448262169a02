"""PagedKVCache on layouts the other tests do not use, checked on the bytes.

A state machine runs random engine steps (allocate, extend, fork, free, swap
out / in, defragment, pressure, a store that fails, refuses or forgets) on
each drawn layout: fp8, bf16, fp16 and fp32 KV, blocks of 1, 3 or 5 tokens,
one to three blocks per offload row. Each token writes a byte pattern of its
prefix into its slot of every layer (through a byte view, so every dtype
holds it exactly); after every step each request reads back exactly its own
tokens' patterns, and the cached tokens of each allocation were right before
the engine wrote anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio
import msgspec
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvactors.errors import OutOfBlocksError, TransferError
from kvactors.keys import Key
from kvactors.paged import KVCacheConfig, PagedKVCache, RequestId, SwappedOut

T = TypeVar("T")


class Hits(msgspec.Struct, frozen=True):
    hits: int


class Store:
    """Rows by key in memory, the oldest dropped beyond ``capacity``; switches to
    fail a load, fail a store or refuse one."""

    def __init__(self, row_bytes: int, capacity: int) -> None:
        self.row_bytes, self.capacity = row_bytes, capacity
        self.rows: OrderedDict[Key, torch.Tensor] = OrderedDict()
        self.fail_load = self.fail_store = self.refuse_store = False

    async def lookup(self, keys: Sequence[Key]) -> Hits:
        await anyio.lowlevel.checkpoint()
        hits = 0
        while hits < len(keys) and keys[hits] in self.rows:
            hits += 1
        return Hits(hits)

    async def store(self, keys: Sequence[Key], src: torch.Tensor) -> int | None:
        assert src.dtype == torch.uint8
        assert tuple(src.shape) == (len(keys), self.row_bytes)
        await anyio.lowlevel.checkpoint()
        if self.fail_store:
            raise TransferError("store: disk full")
        if self.refuse_store:
            return None
        for key, row in zip(keys, src, strict=True):
            self.rows.setdefault(key, row.clone())
        while len(self.rows) > self.capacity:
            self.rows.popitem(last=False)
        return len(keys)

    async def load(self, keys: Sequence[Key], dst: torch.Tensor) -> None:
        assert tuple(dst.shape) == (len(keys), self.row_bytes)
        await anyio.lowlevel.checkpoint()
        if self.fail_load or any(key not in self.rows for key in keys):
            raise TransferError("load: read error")
        for i, key in enumerate(keys):
            dst[i] = self.rows[key]


def pattern(tokens: Sequence[int], position: int, nbytes: int) -> torch.Tensor:
    """The bytes token ``position`` of ``tokens`` writes into one layer's slot."""
    seed = hashlib.blake2b(struct.pack(f"<{position + 1}q", *tokens[: position + 1])).digest()
    out = bytearray()
    counter = 0
    while len(out) < nbytes:
        out += hashlib.blake2b(seed + counter.to_bytes(4, "little")).digest()
        counter += 1
    return torch.frombuffer(out[:nbytes], dtype=torch.uint8).clone()


def run(call: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``call(*args)`` on a fresh event loop, failing after 10 seconds."""

    async def timed() -> T:
        with anyio.fail_after(10):
            return await call(*args)

    return anyio.run(timed)


class Layouts(RuleBasedStateMachine):
    @initialize(
        dtype=st.sampled_from(["float8_e4m3fn", "float8_e5m2", "bfloat16", "float16", "float32"]),
        block_size=st.sampled_from([1, 3, 5]),
        per_row=st.integers(1, 3),
        blocks=st.integers(4, 12),
        watermark=st.sampled_from([0.0, 0.25, 0.5]),
        capacity=st.integers(1, 10),
        heads=st.integers(1, 2),
    )
    def setup(
        self,
        dtype: str,
        block_size: int,
        per_row: int,
        blocks: int,
        watermark: float,
        capacity: int,
        heads: int,
    ) -> None:
        layout = KVCacheConfig(
            num_layers=2,
            num_kv_heads=heads,
            head_dim=3,
            num_gpu_blocks=blocks,
            dtype=dtype,
            block_size=block_size,
        )
        config = msgspec.structs.replace(
            layout,
            offload_block_bytes=per_row * layout.block_size_bytes,
            watermark=watermark,
        )
        assert config.blocks_per_offload == per_row
        self.bs = block_size
        self.store = Store(config.offload_bytes, capacity)
        self.cache = PagedKVCache(config, self.store)
        self.slot_bytes = 2 * heads * 3 * config.torch_dtype.itemsize  # key and value
        self.tokens: dict[RequestId, list[int]] = {}
        self.swapped: list[SwappedOut] = []
        self.prefixes = [[], [9] * (2 * block_size * per_row + 1), list(range(3 * block_size))]
        self.next_id = 0

    # -- the engine's side: write and read the bytes of a token --------------------

    def _slot(self, rid: RequestId, p: int) -> list[torch.Tensor]:
        """The byte views of token ``p``'s keys and values, layer by layer (contiguous)."""
        table = self.cache.allocator.get_block_table(rid)
        block, slot = table[p // self.bs], p % self.bs
        return [
            t[side, block, slot].view(torch.uint8).view(-1)
            for t in self.cache.kv.layers
            for side in (0, 1)
        ]

    def write(self, rid: RequestId, start: int) -> None:
        tokens = self.tokens[rid]
        for p in range(start, len(tokens)):
            want = pattern(tokens, p, self.slot_bytes * len(self.cache.kv.layers))
            for i, view in enumerate(self._slot(rid, p)):
                view.copy_(want[i * view.numel() : (i + 1) * view.numel()])

    def check(self, rid: RequestId, upto: int | None = None) -> None:
        tokens = self.tokens[rid]
        for p in range(len(tokens) if upto is None else upto):
            want = pattern(tokens, p, self.slot_bytes * len(self.cache.kv.layers))
            got = torch.cat(self._slot(rid, p))
            assert torch.equal(got, want), f"request {rid!r}, position {p}"

    def running(self) -> list[RequestId]:
        return sorted(self.tokens, key=str)

    # -- steps -------------------------------------------------------------------------

    @rule(which=st.integers(0, 2), suffix=st.lists(st.integers(0, 2), max_size=8))
    def allocate(self, which: int, suffix: list[int]) -> None:
        tokens = self.prefixes[which] + suffix
        if not tokens or -(-len(tokens) // self.bs) > self.cache.config.num_gpu_blocks:
            return
        self.next_id += 1
        rid = self.next_id
        try:
            got = run(self.cache.allocate, rid, tokens)
        except OutOfBlocksError:
            return
        assert got.num_loaded_tokens <= got.num_cached_tokens < len(tokens)
        self.tokens[rid] = tokens
        self.check(rid, got.num_cached_tokens)
        self.write(rid, got.num_cached_tokens)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), new=st.lists(st.integers(0, 2), min_size=1, max_size=6))
    def extend(self, data: st.DataObject, new: list[int]) -> None:
        rid = data.draw(st.sampled_from(self.running()))
        total = -(-(len(self.tokens[rid]) + len(new)) // self.bs)
        if total > self.cache.config.num_gpu_blocks:
            return
        try:
            run(self.cache.extend, rid, new)
        except OutOfBlocksError:
            return
        self.tokens[rid] = self.tokens[rid] + new
        self.write(rid, len(self.tokens[rid]) - len(new))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(self.running()))
        self.next_id += 1
        self.cache.fork(rid, self.next_id)
        self.tokens[self.next_id] = list(self.tokens[rid])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(self.running()))
        assert self.cache.free(rid) == self.tokens.pop(rid)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def swap_out(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(self.running()))
        out = run(self.cache.swap_out, rid)
        assert out.token_ids == self.tokens.pop(rid)
        assert out.request_id == rid
        self.swapped.append(out)

    @precondition(lambda self: self.swapped)
    @rule(data=st.data())
    def swap_in(self, data: st.DataObject) -> None:
        out = data.draw(st.sampled_from(self.swapped))
        try:
            got = run(self.cache.swap_in, out)
        except OutOfBlocksError:
            return
        self.swapped.remove(out)
        assert got.num_loaded_tokens <= got.num_cached_tokens <= len(out.token_ids)
        self.tokens[out.request_id] = list(out.token_ids)
        self.check(out.request_id, got.num_cached_tokens)
        self.write(out.request_id, got.num_cached_tokens)

    @rule()
    def defragment(self) -> None:
        self.cache.defragment()

    @rule()
    def relieve_pressure(self) -> None:
        run(self.cache.relieve_pressure)

    @rule(
        fail_load=st.booleans(),
        fail_store=st.booleans(),
        refuse_store=st.booleans(),
        forget=st.booleans(),
    )
    def weather(self, fail_load: bool, fail_store: bool, refuse_store: bool, forget: bool) -> None:
        self.store.fail_load = fail_load
        self.store.fail_store = fail_store
        self.store.refuse_store = refuse_store
        if forget:
            with contextlib.suppress(KeyError):
                self.store.rows.popitem(last=False)

    @invariant()
    def every_request_reads_its_own_bytes(self) -> None:
        for rid in self.running():
            self.check(rid)
        a = self.cache.allocator
        s = a.stats()
        assert s.used + s.cached + s.empty == a.num_blocks
        assert sorted(a.request_ids(), key=str) == self.running()


TestLayouts = Layouts.TestCase
TestLayouts.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(["float8_e5m2", "bfloat16", "float32"]),
    block_size=st.sampled_from([1, 3, 5]),
    per_row=st.integers(1, 3),
    length=st.integers(1, 20),
    held=st.booleans(),
)
def test_a_swap_round_trip_brings_back_every_token(
    dtype: str, block_size: int, per_row: int, length: int, held: bool
) -> None:
    """docs/paged.md: swap_out stores what is not offloaded yet (the partial block
    too, under a tail key) and frees; swap_in shares what is still in the pool and
    loads the rest: with a store that keeps everything, every token comes back,
    whatever the layout. ``held``: a fork keeps the blocks in the pool meanwhile."""
    machine = Layouts()
    blocks = 2 * -(-length // block_size) + 1
    machine.setup(
        dtype=dtype,
        block_size=block_size,
        per_row=per_row,
        blocks=blocks,
        watermark=0.0,
        capacity=1000,
        heads=1,
    )
    cache = machine.cache
    tokens = [(7 * i) % 5 for i in range(length)]
    got = run(cache.allocate, "r", tokens)
    machine.tokens["r"] = tokens
    machine.write("r", got.num_cached_tokens)
    if held:
        cache.fork("r", "twin")
    out = run(cache.swap_out, "r")
    assert out.token_ids == tokens
    if not held:
        filler = list(range(100, 100 + blocks * block_size))  # evicts every cached block
        run(cache.allocate, "filler", filler)
        cache.free("filler")
    back = run(cache.swap_in, out)
    assert back.num_cached_tokens == length
    full = length // block_size * block_size
    assert back.num_loaded_tokens == (length - full if held else length)
    machine.check("r")
