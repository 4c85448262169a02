"""The scheduler side of the vLLM backend (no vLLM needed): plans, tiers, recency.

The strongest check replays random vLLM-like call sequences against a model of
the worker: slots hold key names, plans run in the order they were made, and
every load must deliver each key's own bytes."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvactors.errors import ConfigError
from kvactors.vllm import extra_config, parse_settings
from kvactors.vllm.config import num_slots
from kvactors.vllm.tiers import CPU, NVME, PrefetchPlan, TieredManager, TransferPlan


def k(i: int) -> bytes:
    return i.to_bytes(8, "big") + (0).to_bytes(4, "big")


def _leading_hits(tiers: TieredManager, keys: list[bytes]) -> list[bytes]:
    """The keys vLLM would load: the leading run that ``lookup`` answers ``"hit"``."""
    hits = []
    for key in keys:
        if tiers.lookup(key) != "hit":
            break
        hits.append(key)
    return hits


class FakeWorker:
    """Slots hold the key whose bytes they carry; plans run in submission order."""

    def __init__(self, cpu: int, nvme: int) -> None:
        self.cpu: list[bytes | None] = [None] * cpu
        self.nvme: list[bytes | None] = [None] * nvme
        self.gpu: dict[int, bytes] = {}

    def run(self, store: bool, keys: list[bytes], plan: TransferPlan) -> list[bytes]:
        d = plan.demote
        for cs, ns in zip(d.cpu_slots, d.nvme_slots):
            self.nvme[ns] = self.cpu[cs]
        if store:
            for key, slot in zip(keys, plan.cpu_slots):
                self.cpu[slot] = key  # the GPU holds the key's bytes
            w = plan.write_through
            for cs, ns in zip(w.cpu_slots, w.nvme_slots):
                self.nvme[ns] = self.cpu[cs]
            return []
        got: list[bytes | None] = [self.cpu[s] if s >= 0 else None for s in plan.cpu_slots]
        p = plan.promote
        for pos, ns, key in zip(p.cpu_slots, p.nvme_slots, p.keys):
            assert self.nvme[ns] == key, "NVMe slot read holds another block"
            slot = plan.cpu_slots[pos]
            if slot >= 0:
                self.cpu[slot] = self.nvme[ns]
            got[pos] = self.nvme[ns]
        out = []
        for key, value in zip(keys, got):
            assert value == key, f"load of {key!r} delivered {value!r}"
            out.append(key)
        return out

    def prefetch(self, key: bytes, plan: PrefetchPlan) -> None:
        """A prefetch's moves: demote the slot's victim, then read NVMe into the slot."""
        d = plan.demote
        for cs, ns in zip(d.cpu_slots, d.nvme_slots):
            self.nvme[ns] = self.cpu[cs]
        assert self.nvme[plan.nvme_slot] == key, "prefetch read holds another block"
        self.cpu[plan.cpu_slot] = self.nvme[plan.nvme_slot]


ops = st.lists(
    st.tuples(
        st.sampled_from(["store", "load", "finish", "complete", "prefetch", "mail"]),
        st.lists(st.integers(0, 30), min_size=1, max_size=6, unique=True),
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(
    ops=ops,
    mode=st.sampled_from(["back", "through"]),
    policy=st.sampled_from(["lru", "arc", "prefix_admit"]),
)
def test_random_calls_always_load_the_right_bytes(
    ops: list[tuple[str, list[int]]], mode: str, policy: str
) -> None:
    """Jobs run in order, prefetch moves (the mailbox) in order, the two queues
    interleaved arbitrarily, as a worker serves them; ``prefix_admit`` may store
    fewer keys than offered."""
    tiers = TieredManager(6, 12, policy=policy, write_mode=mode)
    worker = FakeWorker(6, 12)
    jobs: deque[tuple[bool, list[bytes], TransferPlan]] = deque()
    mail: deque[tuple[bytes, PrefetchPlan]] = deque()
    loaded = 0
    for op, ids in ops:
        keys = [k(i) for i in ids]
        if op == "store":
            out = tiers.prepare_store(keys)
            if out is not None and out[0]:
                jobs.append((True, out[0], out[1]))
        elif op == "load":
            # vLLM loads the leading run of hits; pending keys make it wait
            hits = _leading_hits(tiers, keys)
            if hits:
                jobs.append((False, hits, tiers.prepare_load(hits)))
        elif op == "finish":
            tiers.finish(keys)
        elif op == "prefetch":
            for key in keys:
                plan = tiers.start_prefetch(key)
                if plan is not None:
                    assert tiers.lookup(key) == "pending"
                    mail.append((key, plan))
        elif op == "mail":
            if mail:  # the worker carries out the oldest prefetch; the scheduler polls
                key, pplan = mail.popleft()
                worker.prefetch(key, pplan)
                for victim in pplan.demote.keys:
                    tiers.complete_demotion(victim, True)
                tiers.complete_prefetch(key, True)
                assert tiers.source(key) == CPU
        elif jobs:  # the worker finishes the oldest job; vLLM completes it
            store, jkeys, plan = jobs.popleft()
            loaded += len(worker.run(store, jkeys, plan))
            if store:
                tiers.complete_store(set(jkeys))
            else:
                tiers.complete_load(set(jkeys))
    while jobs:
        store, jkeys, plan = jobs.popleft()
        worker.run(store, jkeys, plan)
        (tiers.complete_store if store else tiers.complete_load)(set(jkeys))
    while mail:
        key, pplan = mail.popleft()
        worker.prefetch(key, pplan)
        for victim in pplan.demote.keys:
            tiers.complete_demotion(victim, True)
        tiers.complete_prefetch(key, True)
    assert tiers.prefetching == 0
    stats = tiers.cpu.stats()
    assert stats.pinned == 0
    assert stats.being_written == 0
    assert tiers.nvme is not None
    assert tiers.nvme.stats().pinned == 0
    assert tiers.nvme.stats().being_written == 0


def _store(tiers: TieredManager, worker: FakeWorker, ids: range) -> None:
    keys = [k(i) for i in ids]
    out = tiers.prepare_store(keys)
    assert out is not None
    worker.run(True, out[0], out[1])
    tiers.complete_store(out[0])


def test_cpu_victims_are_demoted_and_promoted_back() -> None:
    tiers = TieredManager(4, 8)
    worker = FakeWorker(4, 8)
    _store(tiers, worker, range(4))
    _store(tiers, worker, range(4, 8))  # evicts 0..3 to NVMe
    assert all(tiers.source(k(i)) == NVME for i in range(4))
    assert all(tiers.source(k(i)) == CPU for i in range(4, 8))
    plan = tiers.prepare_load([k(0), k(1)])
    assert len(plan.promote) == 2
    assert all(s >= 0 for s in plan.cpu_slots)  # promoted into CPU slots
    assert sorted(plan.demote.keys) == [k(4), k(5)]  # their CPU slots are reused
    worker.run(False, [k(0), k(1)], plan)
    tiers.complete_load([k(0), k(1)])
    assert tiers.source(k(0)) == CPU
    counters = tiers.take_counters()
    assert counters["demoted_blocks"] == 6
    assert counters["promoted_blocks"] == 2
    assert counters["nvme_load_blocks"] == 2


def test_pending_blocks_are_not_hits_until_completed() -> None:
    tiers = TieredManager(4, 8)
    out = tiers.prepare_store([k(1)])
    assert out is not None
    assert tiers.lookup(k(1)) == "pending"
    tiers.complete_store([k(1)])
    assert tiers.lookup(k(1)) == "hit"
    assert tiers.lookup(k(2)) == "miss"


def test_failed_store_forgets_the_block_and_its_demotions() -> None:
    tiers = TieredManager(2, 4)
    worker = FakeWorker(2, 4)
    _store(tiers, worker, range(2))
    out = tiers.prepare_store([k(5), k(6)])
    assert out is not None
    assert len(out[1].demote) == 2
    tiers.complete_store(out[0], success=False)
    assert tiers.lookup(k(5)) == "miss"
    assert tiers.lookup(k(0)) == "miss"  # its demotion did not land either


def test_write_through_puts_every_store_on_nvme() -> None:
    tiers = TieredManager(2, 8, write_mode="through")
    worker = FakeWorker(2, 8)
    _store(tiers, worker, range(2))
    assert tiers.nvme is not None
    assert all(k(i) in tiers.nvme for i in range(2))
    _store(tiers, worker, range(2, 4))
    assert tiers.take_counters()["demoted_blocks"] == 0  # already on NVMe
    assert tiers.source(k(0)) == NVME


def test_without_nvme_victims_are_dropped() -> None:
    tiers = TieredManager(2)
    worker = FakeWorker(2, 0)
    _store(tiers, worker, range(2))
    _store(tiers, worker, range(2, 4))
    assert tiers.lookup(k(0)) == "miss"
    assert tiers.take_counters()["dropped_blocks"] == 2


def test_finish_makes_a_request_most_recent() -> None:
    tiers = TieredManager(4)
    worker = FakeWorker(4, 0)
    _store(tiers, worker, range(4))
    tiers.finish([k(0), k(1)])  # used again: 2 and 3 are now the oldest
    _store(tiers, worker, range(10, 12))
    assert tiers.lookup(k(0)) == "hit"
    assert tiers.lookup(k(1)) == "hit"
    assert tiers.lookup(k(2)) == "miss"


def test_events_name_the_tier() -> None:
    tiers = TieredManager(2, 4, enable_events=True)
    worker = FakeWorker(2, 4)
    _store(tiers, worker, range(2))
    _store(tiers, worker, range(2, 4))
    events = tiers.take_events()
    assert ([k(0), k(1)], CPU, False) in events
    assert ([k(0), k(1)], CPU, True) in events
    assert ([k(0), k(1)], NVME, False) in events


def test_reset_forgets_everything() -> None:
    tiers = TieredManager(2, 4)
    worker = FakeWorker(2, 4)
    _store(tiers, worker, range(2))
    tiers.reset()
    assert tiers.lookup(k(0)) == "miss"


def test_settings_parse_and_name_bad_keys() -> None:
    s = parse_settings(extra_config(cpu_bytes=1 << 20, nvme_bytes="4096", write_mode="through"))
    assert (s.cpu_bytes, s.nvme_bytes, s.write_mode, s.policy) == (1 << 20, 4096, "through", "lru")
    assert s.resolved_nvme_policy == "lru"
    with pytest.raises(ConfigError, match=r"'cpu_bytes'.*required"):
        parse_settings({})
    with pytest.raises(ConfigError, match=r"'cpu_byte'.*unknown key"):
        parse_settings({"cpu_byte": 1})
    with pytest.raises(ConfigError, match=r"'policy'.*'fifo' is not one of"):
        parse_settings({"cpu_bytes": 1, "policy": "fifo"})
    with pytest.raises(ConfigError, match=r"'write_mode'"):
        parse_settings({"cpu_bytes": 1, "write_mode": "around"})
    with pytest.raises(ConfigError, match=r"'nvme_bytes'.*>= 0"):
        parse_settings({"cpu_bytes": 1, "nvme_bytes": -1})
    with pytest.raises(ConfigError, match=r"'cpu_bytes'.*expected an int"):
        parse_settings({"cpu_bytes": True})
    with pytest.raises(ConfigError, match=r"'nvme_directory'"):
        parse_settings({"cpu_bytes": 1, "nvme_directory": ""})
    # vLLM's own keys pass through
    parse_settings({"cpu_bytes": 1, "blocks_per_chunk": 2, "offload_prompt_only": False})


def test_slot_counts() -> None:
    assert num_slots(10 * 4096, 4096, 1, "cpu_bytes") == 10
    assert num_slots(10 * 4096, 4096, 2, "cpu_bytes") == 5
    assert num_slots(0, 4096, 1, "nvme_bytes") == 0
    with pytest.raises(ConfigError, match=r"'cpu_bytes'.*hold no block"):
        num_slots(100, 4096, 1, "cpu_bytes")


def test_store_is_refused_while_every_cpu_slot_is_busy() -> None:
    tiers = TieredManager(2, 4)
    first = tiers.prepare_store([k(0), k(1)])  # both slots being written
    assert first is not None
    assert tiers.prepare_store([k(2)]) is None
    tiers.complete_store(first[0])
    pinned = tiers.prepare_load([k(0), k(1)])  # both slots pinned by a load
    assert pinned.cpu_slots == first[1].cpu_slots
    assert tiers.prepare_store([k(3)]) is None
    assert tiers.take_counters()["failed_stores"] == 2
    tiers.complete_load([k(0), k(1)])
    assert tiers.prepare_store([k(3)]) is not None


def _chat(policy: str) -> tuple[int, int, int]:
    """Turns of 8 conversations (3 shared blocks and a tail no later turn shares)
    through a 16-slot CPU tier, as the vLLM manager drives it: the leading hits
    are loaded, the request's blocks offered for storing, and at its end the
    blocks it used (loaded, or offered while held) are touched. Returns blocks
    offered, stored and hit."""
    import random

    tiers = TieredManager(16, 0, policy=policy)
    worker = FakeWorker(16, 0)
    rng = random.Random(0)
    offered = stored = hit = 0
    for turn in range(400):
        conv = rng.randrange(8)
        keys = [k(conv * 10 + j) for j in range(3)] + [k(1000 + turn)]
        hits = _leading_hits(tiers, keys)
        if hits:
            worker.run(False, hits, tiers.prepare_load(hits))
            tiers.complete_load(hits)
        hit += len(hits)
        used = hits + [key for key in keys if key not in hits and tiers.holds(key)]
        offered += sum(1 for key in keys if not tiers.holds(key))
        out = tiers.prepare_store(keys)
        assert out is not None
        worker.run(True, out[0], out[1])
        tiers.complete_store(out[0])
        stored += len(out[0])
        tiers.finish(used)
    return offered, stored, hit


def test_prefix_admit_stores_fewer_blocks_and_hits_more() -> None:
    """``policy="prefix_admit"``: the manager returns fewer keys to store than
    offered (conversation tails), and more of the prefixes stay to hit."""
    offered, stored, hit = _chat("prefix_admit")
    l_offered, l_stored, l_hit = _chat("lru")
    assert l_stored == l_offered  # LRU stores every new block
    assert stored < offered
    assert hit > l_hit
    assert extra_config(cpu_bytes=1, policy="prefix_admit")["policy"] == "prefix_admit"
