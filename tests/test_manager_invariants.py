"""A hypothesis state machine drives random handshakes through the manager and checks
it against a plain reference model after every step."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from _managers import ADMITTING, MANAGER_POLICIES, make_manager
from kvactors import OffloadingEvent
from kvactors.errors import BlockStateError

KEYS = st.lists(st.integers(0, 11), min_size=1, max_size=5, unique=True)
WRITING = -1


class ManagerMachine(RuleBasedStateMachine):
    policy = "lru"
    capacity = 5

    def __init__(self) -> None:
        super().__init__()
        self.mgr = make_manager(self.capacity, self.policy, enable_events=True)
        self.ref: dict[int, int] = {}  # key -> ref count (-1 = being written)
        self.slot: dict[int, int] = {}
        self.events: list[OffloadingEvent] = []

    def snapshot(self) -> tuple[object, ...]:
        blocks = {k: (b.block_id, b.ref_cnt) for k in self.ref if (b := self.mgr.get(k))}
        return (blocks, len(self.mgr), self.mgr.num_free_blocks)

    @rule(keys=KEYS)
    def lookup(self, keys: list[int]) -> None:
        want = 0
        for k in keys:
            if self.ref.get(k, WRITING) < 0:
                break
            want += 1
        assert self.mgr.lookup(keys) == want

    @rule(keys=KEYS)
    def touch(self, keys: list[int]) -> None:
        before = self.snapshot()
        self.mgr.touch(keys)
        assert self.snapshot() == before  # recency only: no state changes

    @rule(keys=KEYS)
    def prepare_store(self, keys: list[int]) -> None:
        new = [k for k in keys if k not in self.ref]
        free = self.capacity - len(self.ref)
        idle = [k for k, r in self.ref.items() if r == 0 and k not in keys]
        before = self.snapshot()
        out = self.mgr.prepare_store(keys)
        if out is None:
            assert len(new) > free + len(idle), "refused although idle blocks sufficed"
            assert self.snapshot() == before
            return
        stored = out.block_hashes_to_store
        if self.mgr.policy_name in ADMITTING:
            # An admitting policy may decline new keys: it stores a leading part.
            assert stored == new[: len(stored)]
            new = stored
        else:
            assert stored == new
        assert len(out.block_hashes_evicted) == max(0, len(new) - free)
        for victim in out.block_hashes_evicted:
            assert victim in idle, f"evicted {victim} (ref {self.ref.get(victim)})"
            del self.ref[victim]
            del self.slot[victim]
        if out.block_hashes_evicted:
            self.events.append(OffloadingEvent(out.block_hashes_evicted, 16, "CPU", True))
        for k, block_id in zip(new, out.store_spec.block_ids, strict=True):
            self.ref[k] = WRITING
            self.slot[k] = block_id

    @precondition(lambda self: any(r == WRITING for r in self.ref.values()))
    @rule(data=st.data(), success=st.booleans())
    def complete_store(self, data: st.DataObject, success: bool) -> None:
        writing = sorted(k for k, r in self.ref.items() if r == WRITING)
        keys = data.draw(st.lists(st.sampled_from(writing), min_size=1, unique=True))
        ready = [k for k, r in self.ref.items() if r >= 0]
        keys += data.draw(st.lists(st.sampled_from(ready), unique=True)) if ready else []
        self.mgr.complete_store(keys, success=success)
        done = [k for k in keys if self.ref[k] == WRITING]
        for k in done:
            if success:
                self.ref[k] = 0
            else:
                del self.ref[k]
                del self.slot[k]
        if success:
            self.events.append(OffloadingEvent(done, 16, "CPU", False))

    @rule(keys=KEYS)
    def prepare_load(self, keys: list[int]) -> None:
        before = self.snapshot()
        if all(self.ref.get(k, WRITING) >= 0 for k in keys):
            assert self.mgr.prepare_load(keys).block_ids == [self.slot[k] for k in keys]
            for k in keys:
                self.ref[k] += 1
        else:
            with pytest.raises(BlockStateError):
                self.mgr.prepare_load(keys)
            assert self.snapshot() == before

    @rule(keys=KEYS)
    def complete_load(self, keys: list[int]) -> None:
        before = self.snapshot()
        if all(self.ref.get(k, 0) > 0 for k in keys):
            self.mgr.complete_load(keys)
            for k in keys:
                self.ref[k] -= 1
        else:
            with pytest.raises(BlockStateError):
                self.mgr.complete_load(keys)
            assert self.snapshot() == before

    @rule(keys=KEYS)
    def remove(self, keys: list[int]) -> None:
        removed = self.mgr.remove(keys)
        assert removed == [k for k in keys if self.ref.get(k) == 0]
        for k in removed:
            del self.ref[k]
            del self.slot[k]
        if removed:
            self.events.append(OffloadingEvent(removed, 16, "CPU", True))

    @invariant()
    def matches_the_model(self) -> None:
        stats = self.mgr.stats()
        assert stats.used == len(self.ref) <= self.capacity
        assert stats.used + stats.free == self.capacity
        assert stats.pinned == sum(r > 0 for r in self.ref.values())
        assert stats.being_written == sum(r == WRITING for r in self.ref.values())
        ids = []
        for k, r in self.ref.items():
            block = self.mgr.get(k)
            assert block is not None
            assert (block.ref_cnt, block.block_id) == (r, self.slot[k])
            ids.append(block.block_id)
        assert len(set(ids)) == len(ids)
        assert all(0 <= i < self.capacity for i in ids)
        events = [e for e in self.events if e.block_hashes]
        got = [e for e in self.mgr.take_events() if e.block_hashes]
        assert got == events
        self.events = []


def machine_for(policy: str) -> type[ManagerMachine]:
    return type(f"{policy}Machine", (ManagerMachine,), {"policy": policy})


@pytest.mark.parametrize("policy", MANAGER_POLICIES)
def test_manager_state_machine(policy: str) -> None:
    run_state_machine_as_test(
        machine_for(policy),
        settings=settings(max_examples=60, stateful_step_count=40, deadline=None),
    )
