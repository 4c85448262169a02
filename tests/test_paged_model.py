"""BlockAllocator against a reference model written from docs/paged.md.

The model keeps, per block, its reference count and key, the empty blocks
(handed out lowest id first), the cached blocks in LRU order (a freed
request's tail first), and the cache index; it predicts every call's result
(shared tokens, errors, block tables, evictions, pressure callbacks) on
block sizes, pool sizes, watermarks and token ids (int64 extremes, negatives)
other than the scenario tests use.
"""

from __future__ import annotations

import heapq

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvactors.errors import OutOfBlocksError, PagedCacheError
from kvactors.paged import BlockAllocator, MemoryPressure, OffloadItem, hash_block, hash_tail

ROOT = b"model-root"
TOKEN = st.sampled_from([0, 1, 2, -1, 2**63 - 1, -(2**63)])


def keys_of(tokens: list[int], block_size: int) -> list[bytes]:
    """Chained keys of the full blocks, one ``hash_block`` at a time."""
    keys: list[bytes] = []
    parent = ROOT
    for i in range(len(tokens) // block_size):
        parent = hash_block(parent, tokens[i * block_size : (i + 1) * block_size])
        keys.append(parent)
    return keys


class Model:
    def __init__(self, num_blocks: int, block_size: int, watermark: int, offloading: bool) -> None:
        self.n, self.bs, self.wm = num_blocks, block_size, watermark
        self.offloading = offloading
        self.clean = [False] * num_blocks  # bytes known to be in the offload store
        self.evicted: list[OffloadItem] = []  # what the last take planned to store
        self.empty = list(range(num_blocks))
        self.lru: list[int] = []
        self.ref = [0] * num_blocks
        self.key: list[bytes | None] = [None] * num_blocks
        self.by_key: dict[bytes, int] = {}
        self.tokens: dict[int, list[int]] = {}
        self.blocks: dict[int, list[int]] = {}
        self.valid: dict[int, int] = {}

    def free_count(self) -> int:
        return len(self.empty) + len(self.lru)

    def clean_cached(self) -> int:
        return sum(self.clean[b] for b in self.lru)

    def under_pressure(self) -> bool:
        return len(self.empty) + self.clean_cached() < self.wm

    def take(self, n: int) -> list[int]:
        got = [heapq.heappop(self.empty) for _ in range(min(n, len(self.empty)))]
        self.evicted = []
        while len(got) < n:
            b = self.lru.pop(0)
            key = self.key[b]
            assert key is not None
            if self.offloading and not self.clean[b]:
                self.evicted.append(OffloadItem(key, [b], [key]))
            del self.by_key[key]
            self.key[b] = None
            self.clean[b] = False
            got.append(b)
        for b in got:
            self.ref[b] = 1
        return got

    def register(self, rid: int, i: int, key: bytes) -> None:
        if key not in self.by_key:
            b = self.blocks[rid][i]
            self.by_key[key] = b
            self.key[b] = key


class AllocatorVsModel(RuleBasedStateMachine):
    OFFLOADING = False

    def stored(self, items: list[OffloadItem], success: bool) -> None:
        """Complete a store: on success, the blocks still registered under the
        items' keys are clean."""
        self.a.complete_offload(items, success)
        if success:
            for item in items:
                for key in item.hashes:
                    b = self.m.by_key.get(key) if key is not None else None
                    if b is not None:
                        self.m.clean[b] = True

    @initialize(
        num_blocks=st.integers(1, 9),
        block_size=st.sampled_from([1, 2, 3, 5, 7]),
        watermark=st.integers(0, 10),
    )
    def setup(self, num_blocks: int, block_size: int, watermark: int) -> None:
        self.a = BlockAllocator(
            num_blocks,
            block_size,
            watermark_blocks=watermark,
            offloading=self.OFFLOADING,
            root=ROOT,
        )
        self.m = Model(num_blocks, block_size, watermark, self.OFFLOADING)
        self.events: list[MemoryPressure] = []
        self.a.add_pressure_callback(self.events.append)
        self.next_id = 0
        self.prefixes = [[], [5] * block_size * 2, [7, 8] * block_size]

    def pressure_check(self, took: bool) -> None:
        expected = 1 if took and self.m.under_pressure() else 0
        assert len(self.events) == expected, (self.events, took)
        if expected:
            m = self.m
            want = MemoryPressure(len(m.empty), m.clean_cached(), len(m.lru), m.wm)
            assert self.events[0] == want
        self.events.clear()

    @rule(
        which=st.integers(0, 2),
        suffix=st.lists(TOKEN, max_size=12),
        compute_last=st.booleans(),
        success=st.booleans(),
    )
    def allocate(self, which: int, suffix: list[int], compute_last: bool, success: bool) -> None:
        m = self.m
        tokens = self.prefixes[which] + suffix
        self.next_id += 1
        rid = self.next_id
        bs = m.bs
        keys = keys_of(tokens, bs)
        limit = (len(tokens) - 1) // bs if compute_last else len(tokens) // bs
        r = 0
        while r < limit and keys[r] in m.by_key:
            r += 1
        total = -(-len(tokens) // bs)
        hits = [m.by_key[k] for k in keys[:r]]
        idle = sum(1 for b in hits if m.ref[b] == 0)
        if not tokens or total > m.n:
            with pytest.raises(PagedCacheError) as info:
                self.a.allocate(rid, tokens, compute_last=compute_last)
            assert type(info.value) is PagedCacheError
            assert not self.events
            return
        if total - r > m.free_count() - idle:
            with pytest.raises(OutOfBlocksError):
                self.a.allocate(rid, tokens, compute_last=compute_last)
            assert not self.events
            return
        plan = self.a.allocate(rid, tokens, compute_last=compute_last)
        for b in hits:
            if m.ref[b] == 0:
                m.lru.remove(b)
            m.ref[b] += 1
        fresh = m.take(total - r)
        m.tokens[rid] = list(tokens)
        m.blocks[rid] = hits + fresh
        m.valid[rid] = r
        for i in range(r, len(keys)):
            m.register(rid, i, keys[i])
        assert plan.num_shared_tokens == plan.num_cached_tokens == min(len(tokens), r * bs)
        if compute_last:
            assert plan.num_cached_tokens < len(tokens)
        assert plan.block_table.block_ids == m.blocks[rid]
        assert plan.block_table.num_tokens == len(tokens)
        assert (plan.restore_keys, plan.evicted) == ([], m.evicted)
        self.stored(plan.evicted, success)
        self.pressure_check(took=bool(total - r or idle))

    @precondition(lambda self: self.m.tokens)
    @rule(data=st.data(), new=st.lists(TOKEN, max_size=8), success=st.booleans())
    def extend(self, data: st.DataObject, new: list[int], success: bool) -> None:
        m = self.m
        rid = data.draw(st.sampled_from(sorted(m.tokens)))
        old = m.tokens[rid]
        blocks = m.blocks[rid]
        bs = m.bs
        total = -(-(len(old) + len(new)) // bs)
        cow = bool(new) and len(old) % bs != 0 and m.ref[blocks[-1]] > 1
        needed = total - len(blocks) + int(cow)
        if new and total > m.n:
            with pytest.raises(PagedCacheError) as info:
                self.a.extend(rid, new)
            assert type(info.value) is PagedCacheError
            return
        if new and needed > m.free_count():
            with pytest.raises(OutOfBlocksError):
                self.a.extend(rid, new)
            return
        plan = self.a.extend(rid, new)
        if not new:
            assert (plan.evicted, plan.copies) == ([], [])
            return
        m.valid[rid] = len(blocks)
        fresh = m.take(needed)
        copies = []
        if cow:
            copy = fresh.pop(0)
            copies.append((blocks[-1], copy))
            m.ref[blocks[-1]] -= 1
            blocks[-1] = copy
        blocks += fresh
        n_old = len(old) // bs
        m.tokens[rid] = old + new
        keys = keys_of(m.tokens[rid], bs)
        for i in range(n_old, len(keys)):
            m.register(rid, i, keys[i])
        assert plan.copies == copies
        assert plan.evicted == m.evicted
        self.stored(plan.evicted, success)
        assert self.a.get_block_table(rid).block_ids == blocks
        self.pressure_check(took=needed > 0)

    @precondition(lambda self: self.m.tokens)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        m = self.m
        rid = data.draw(st.sampled_from(sorted(m.tokens)))
        self.next_id += 1
        child = self.next_id
        table = self.a.fork(rid, child)
        m.tokens[child] = list(m.tokens[rid])
        m.blocks[child] = list(m.blocks[rid])
        m.valid[child] = m.valid[rid]
        for b in m.blocks[child]:
            m.ref[b] += 1
        assert table.block_ids == m.blocks[child]
        with pytest.raises(PagedCacheError):
            self.a.fork(rid, child)
        assert not self.events

    @precondition(lambda self: self.m.tokens)
    @rule(data=st.data(), computed=st.booleans())
    def free(self, data: st.DataObject, computed: bool, rid: int | None = None) -> None:
        m = self.m
        if rid is None:
            rid = data.draw(st.sampled_from(sorted(m.tokens)))
        table = self.a.get_block_table(rid)
        assert self.a.free(rid, computed=computed) == m.tokens[rid]
        blocks = m.blocks.pop(rid)
        valid = m.valid.pop(rid)
        del m.tokens[rid]
        for i in range(len(blocks) - 1, -1, -1):
            b = blocks[i]
            m.ref[b] -= 1
            if m.ref[b]:
                continue
            key = m.key[b]
            if key is not None and (computed or i < valid):
                m.lru.append(b)
            else:
                if key is not None:
                    del m.by_key[key]
                    m.key[b] = None
                m.clean[b] = False
                heapq.heappush(m.empty, b)
        for use in (lambda: table.block_ids, lambda: len(table), lambda: table[0]):
            with pytest.raises(PagedCacheError):
                use()
        for call in (self.a.free, self.a.get_block_table):
            with pytest.raises(PagedCacheError):
                call(rid)
        with pytest.raises(PagedCacheError):
            self.a.extend(rid, [1])
        assert not self.events

    @rule(suffix=st.lists(TOKEN, max_size=10), compute_last=st.booleans())
    def match(self, suffix: list[int], compute_last: bool) -> None:
        m = self.m
        tokens = self.prefixes[1] + suffix
        keys = keys_of(tokens, m.bs)
        limit = (len(tokens) - 1) // m.bs if compute_last else len(tokens) // m.bs
        r = 0
        while r < limit and keys[r] in m.by_key:
            r += 1
        got = self.a.match(tokens, compute_last=compute_last)
        assert got.num_resident_tokens == min(len(tokens), r * m.bs)

    @rule()
    def defragment(self) -> None:
        m = self.m
        live = [b for b in range(m.n) if m.ref[b] or m.key[b] is not None]
        holes = sorted(b for b in m.empty if b < len(live))
        movers = [b for b in live if b >= len(live)]
        expected = dict(zip(movers, holes, strict=True))
        assert self.a.defragment() == expected
        new_ref = list(m.ref)
        new_key = list(m.key)
        new_clean = list(m.clean)
        for old, new in expected.items():
            new_clean[new], new_clean[old] = m.clean[old], False
            new_ref[new], new_ref[old] = m.ref[old], 0
            new_key[new], new_key[old] = m.key[old], None
        m.ref, m.key, m.clean = new_ref, new_key, new_clean
        m.by_key = {k: b for b, k in enumerate(m.key) if k is not None}
        m.blocks = {rid: [expected.get(b, b) for b in bl] for rid, bl in m.blocks.items()}
        m.lru = [expected.get(b, b) for b in m.lru]
        m.empty = list(range(len(live), m.n))

    @precondition(lambda self: self.OFFLOADING)
    @rule(success=st.booleans())
    def relieve_pressure(self, success: bool) -> None:
        m = self.m
        expected: list[OffloadItem] = []
        if m.under_pressure():
            missing = m.wm - len(m.empty) - m.clean_cached()
            for b in m.lru:
                key = m.key[b]
                if missing <= 0:
                    break
                if not m.clean[b] and key is not None:
                    expected.append(OffloadItem(key, [b], [key]))
                    missing -= 1
        assert self.a.prepare_offload() == expected
        self.stored(expected, success)

    @precondition(lambda self: self.OFFLOADING and self.m.tokens)
    @rule(data=st.data(), success=st.booleans())
    def swap_out(self, data: st.DataObject, success: bool) -> None:
        m = self.m
        rid = data.draw(st.sampled_from(sorted(m.tokens)))
        tokens, blocks = m.tokens[rid], m.blocks[rid]
        keys = keys_of(tokens, m.bs)
        expected = [
            OffloadItem(key, [blocks[i]], [key])
            for i, key in enumerate(keys)
            if not m.clean[blocks[i]]
        ]
        if len(tokens) % m.bs:
            tail = hash_tail(keys[-1] if keys else ROOT, tokens[len(keys) * m.bs :])
            expected.append(OffloadItem(tail, [blocks[-1]], [None]))
        assert self.a.prepare_swap_out(rid) == expected
        self.free(data, computed=True, rid=rid)
        self.stored(expected, success)

    @invariant()
    def same_state(self) -> None:
        a, m = self.a, self.m
        assert a.empty_blocks() == sorted(m.empty)
        assert a.cached_blocks() == m.lru
        assert [a.ref_count(b) for b in range(m.n)] == m.ref
        assert [a.block_key(b) for b in range(m.n)] == m.key
        assert [a.is_clean(b) for b in range(m.n)] == m.clean
        assert sorted(a.request_ids()) == sorted(m.tokens)
        for rid, blocks in m.blocks.items():
            assert a.get_block_table(rid).block_ids == blocks
        assert a.num_free_blocks() == m.free_count()
        assert a.usage() == (m.n - m.free_count()) / m.n
        assert a.can_allocate(m.free_count() * m.bs)
        assert not a.can_allocate(m.free_count() * m.bs + 1)
        assert a.under_pressure() == m.under_pressure()
        s = a.stats()
        assert (s.used, s.cached, s.empty, s.clean, s.requests) == (
            m.n - m.free_count(),
            len(m.lru),
            len(m.empty),
            m.clean_cached(),
            len(m.tokens),
        )


class OffloadingVsModel(AllocatorVsModel):
    """The same with offloading: evicted dirty blocks, clean blocks, memory
    pressure counting them, prepare_offload and prepare_swap_out."""

    OFFLOADING = True


TestAllocatorVsModel = AllocatorVsModel.TestCase
TestAllocatorVsModel.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestOffloadingVsModel = OffloadingVsModel.TestCase
TestOffloadingVsModel.settings = TestAllocatorVsModel.settings
