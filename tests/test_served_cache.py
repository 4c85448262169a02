"""Promises of the served cache (``kvactors.open``), one test each: eviction order
through lookups and loads, strict arguments, durable store results, cancellation
and concurrency, start-up sizes, typed errors leaving ``async with``."""

from __future__ import annotations

import random
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import torch

import kvactors
from _served import BB, CPU, drain, fill, rows, settled, small_config
from kvactors.cache import transfers
from kvactors.cli.demo import block_bytes_for
from kvactors.cli.replay import replay
from kvactors.config import Config, MetricsConfig, NVMeConfig, TierConfig
from kvactors.errors import (
    ActorClosed,
    ConfigError,
    InvalidKeyError,
    KVActorsError,
    TensorSpecError,
)
from kvactors.media.faults import InjectedFaults
from kvactors.policy import POLICIES
from kvactors.traces import bundled_trace, load_trace

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup

pytestmark = pytest.mark.anyio


# -- 1. the eviction policy applies to the served cache ----------------------------


@pytest.mark.parametrize("policy", ["lru", "arc", "weighted_lru"])
@pytest.mark.parametrize("access", ["load", "lookup"])
async def test_a_block_used_before_each_store_survives(policy: str, access: str) -> None:
    """CPU tier of 4: a block loaded (or looked up) before each of 20 stores of
    new blocks is never the one evicted; the others come and go."""
    cfg = small_config(cpu={"num_blocks": 4, "policy": policy}, nvme=None)
    with anyio.fail_after(20):
        async with kvactors.open(cfg) as kv:
            fill(kv, [0], [0])
            await kv.store([0], [0])
            for i in range(1, 21):
                if access == "load":
                    await kv.load([0], [1])
                else:
                    assert (await kv.lookup([0])).hits == 1
                fill(kv, [i], [2])
                assert await kv.store([i], [2]) == kvactors.StoreResult(1, 0)
                assert (await kv.lookup([0])).tiers == ["cpu"], f"evicted after {i} stores"
            assert (await kv.lookup([1])).hits == 0  # the cold ones did leave
            await kv.load([0], [1])
            assert torch.equal(rows(kv, [1]), block_bytes_for([0], BB, CPU))


async def test_without_accesses_the_oldest_block_leaves_first() -> None:
    """The counter-test: never touched, the first block is gone after 4 stores."""
    with anyio.fail_after(20):
        async with kvactors.open(small_config(cpu={"num_blocks": 4}, nvme=None)) as kv:
            fill(kv, list(range(6)), list(range(6)))
            for i in range(5):
                await kv.store([i], [i])
            assert (await kv.lookup([0])).hits == 0
            assert (await kv.lookup([1])).hits == 1


async def test_lru_order_follows_lookups_first_key_most_recent() -> None:
    with anyio.fail_after(20):
        async with kvactors.open(small_config(cpu={"num_blocks": 4}, nvme=None)) as kv:
            fill(kv, list(range(6)), list(range(6)))
            await kv.store([0, 1, 2, 3], [0, 1, 2, 3])
            await kv.lookup([2, 0])  # 2 most recent, then 0; 1 and 3 older
            await kv.store([4], [4])  # evicts the least recent: 1 (stored first of 1, 3)
            await kv.store([5], [5])  # then 3
            found = {k: (await kv.lookup([k])).hits for k in range(6)}
            assert found == {0: 1, 1: 0, 2: 1, 3: 0, 4: 1, 5: 1}


async def test_every_key_named_counts_and_a_store_is_not_an_access() -> None:
    """LRU, CPU tier of 4: a key named by a lookup or a partial load past its
    first miss still counts as used; storing a cached key again does not."""
    with anyio.fail_after(20):
        async with kvactors.open(small_config(cpu={"num_blocks": 4}, nvme=None)) as kv:
            fill(kv, list(range(8)), list(range(8)))
            await kv.store([0, 1, 2, 3], [0, 1, 2, 3])
            assert (await kv.lookup([9, 1])).hits == 0  # 9 misses; 1 is used all the same
            assert (await kv.load([9, 2], [20, 21], partial=True)).tiers == []  # so is 2
            assert await kv.store([0], [0]) == kvactors.StoreResult(0, 1)  # 0 stays oldest
            await kv.store([4], [4])  # evicts 0, then 3 (never used since stored)
            await kv.store([5], [5])
            found = {k: (await kv.lookup([k])).hits for k in range(6)}
            assert found == {0: 0, 1: 1, 2: 1, 3: 0, 4: 1, 5: 1}


async def _lru_survivor(steps: list[tuple[str, int]]) -> dict[int, int]:
    """LRU, CPU tier of 4: store 0, 1, 2, 3 one by one (0 oldest), run ``steps``
    (``("lookup" | "load" | "store", key)``), store 4, 5 and 6 (three evictions),
    and say which of 0..3 are still held."""
    async with kvactors.open(small_config(cpu={"num_blocks": 4}, nvme=None)) as kv:
        fill(kv, list(range(8)), list(range(8)))
        for key in range(4):
            await kv.store([key], [key])
        for op, key in steps:
            if op == "lookup":
                await kv.lookup([key])
            elif op == "load":
                await kv.load([key], [10])
            else:
                await kv.store([key], [key])
        for key in (4, 5, 6):
            await kv.store([key], [key])
        return {k: (await kv.lookup([k])).hits for k in range(4)}


async def test_a_lookup_then_a_load_of_a_block_is_one_access() -> None:
    """The load that follows a lookup is the same access: lookups of 0 then 1,
    then a load of 0, leave 1 the more recent (3 evictions take 2, 3, then 0). A
    load that no lookup preceded since the last load counts again (0 then
    outlives 1), and so does one after a store of the block (3 outlives 0 and 1),
    or once the lookup's mark was dropped (only the newest 4 are kept here)."""
    with anyio.fail_after(20):
        one = await _lru_survivor([("lookup", 0), ("lookup", 1), ("load", 0)])
        assert one == {0: 0, 1: 1, 2: 0, 3: 0}
        again = await _lru_survivor([("lookup", 0), ("load", 0), ("lookup", 1), ("load", 0)])
        assert again == {0: 1, 1: 0, 2: 0, 3: 0}
        # 3 is named by a lookup, then stored again (present: skipped), then loaded.
        stored = [("lookup", 3), ("store", 3), ("lookup", 0), ("lookup", 1), ("load", 3)]
        assert await _lru_survivor(stored) == {0: 0, 1: 0, 2: 0, 3: 1}
        # Marks are kept for as many keys as the CPU tier holds (4): four more
        # keys looked up drop 0's, so its load counts again (0 outlives 1).
        bounded = [("lookup", k) for k in (0, 9, 10, 11, 12, 1)] + [("load", 0)]
        assert await _lru_survivor(bounded) == {0: 1, 1: 0, 2: 0, 3: 0}


async def test_a_prefetch_is_not_an_access_of_the_tier_it_promotes_from() -> None:
    """CPU tier of 2, NVMe of 4 holding 0, 1, 2, 3 (0 oldest). A prefetch of 0
    promotes it (its CPU victim demoted: 1 leaves NVMe) and leaves 0 the oldest
    NVMe block, so the next demotion evicts 0 from NVMe, not 2."""
    cfg = small_config(cpu={"num_blocks": 2}, nvme={"num_blocks": 4, "backend": "posix"})
    with anyio.fail_after(20):
        async with kvactors.open(cfg) as kv:
            fill(kv, list(range(8)), list(range(8)))
            for key in range(6):
                await kv.store([key], [key])
            events = await kv.events()
            with events:  # type: ignore[attr-defined]
                assert kv.prefetch([0])
                while (await kv.stats()).policy.promoted < 1:
                    await anyio.sleep(0.01)
                await settled(kv)
                await kv.store([6], [6])  # demotes 5 from CPU: one NVMe block leaves
                removed = [
                    key
                    for event in drain(events)
                    if event.kind == "removed" and event.tier == "nvme"
                    for key in event.keys
                ]
            assert removed == [1, 0]
            assert (await kv.lookup([0])).tiers == ["cpu"]


async def _events_published(subscribe: bool) -> tuple[int, int]:
    """``events_published`` after 12 stores through a CPU tier of 8 over NVMe
    (stores, demotions, removals), and how many events a subscriber received."""
    cfg = small_config()
    received = 0
    with anyio.fail_after(20):
        async with kvactors.open(cfg) as kv:
            fill(kv, list(range(12)), list(range(12)))
            events = await kv.events() if subscribe else None
            for key in range(12):
                await kv.store([key], [key])
            stats = await settled(kv)
            if events is not None:
                with events:  # type: ignore[attr-defined]
                    received = len(drain(events))
    return stats.policy.events_published, received


async def test_events_are_counted_alike_with_and_without_a_subscriber() -> None:
    """With nobody subscribed no event is built, but each is counted all the same."""
    unseen, _ = await _events_published(subscribe=False)
    seen, received = await _events_published(subscribe=True)
    assert unseen == seen == received
    assert seen >= 12  # a stored event per store at least


async def _lookup_load_store(requests: list[list[int]], policy: str, capacity: int) -> int:
    """Per request: ``lookup``, ``load`` of its hits, ``store``; the hits."""
    cfg = Config(cpu=TierConfig(num_blocks=capacity, policy=policy), nvme=None, move_bytes=False)
    hits = 0
    async with kvactors.open(cfg) as kv:
        for keys in requests:
            found = (await kv.lookup(keys)).hits
            if found:
                await kv.load(keys[:found], None)
            hits += found
            await kv.store(keys, None)
    return hits


@pytest.mark.parametrize("policy", sorted(POLICIES))
async def test_lookup_then_load_gives_the_policy_one_access_per_request(policy: str) -> None:
    """A request's ``lookup``, ``load`` of its hits, then ``store`` through the
    served cache gives the policy what one manager's ``lookup``, ``touch``,
    ``prepare_store`` gives it: the same hits on a slice of the bundled synthetic
    trace (counting a hit again at its load gave weighted_lru 1,146 against 1,085)."""
    requests = [list(r.hash_ids) for r in load_trace(bundled_trace("synthetic"))[:1000]]
    capacity = len({k for r in requests for k in r}) // 5
    with anyio.fail_after(120):
        served = await _lookup_load_store(requests, policy, capacity)
    bare = replay(requests, policy, capacity)
    assert served > 0
    assert served == bare.hits, (served, bare.hits)


async def test_a_metadata_only_cache_places_blocks_through_the_actors() -> None:
    """``move_bytes=False``: the same placement (evictions, demotions,
    promotions), no bytes and ``None`` sides; a side given is refused."""
    cfg = small_config(cpu={"num_blocks": 4}, nvme={"num_blocks": 16}, move_bytes=False)
    with anyio.fail_after(20):
        async with kvactors.open(cfg) as kv:
            for i in range(0, 12, 2):
                assert await kv.store([i, i + 1], None) == kvactors.StoreResult(2, 0)
            found = await kv.lookup(list(range(12)))
            assert found.hits == 12
            assert found.tiers.count("cpu") == 4
            loaded = await kv.load([0, 1], None)
            assert loaded.tiers == ["nvme", "nvme"]
            stats = await settled(kv)
            assert (stats.policy.demoted, stats.policy.promoted) == (10, 2)
            with pytest.raises(TensorSpecError, match="None"):
                await kv.store([99], [0])


# -- 8. strict arguments --------------------------------------------------------------


@pytest.mark.parametrize(
    "side",
    [[0.9, 1.7], "01", {0, 1}, [0, "1"], [True, False], torch.tensor([0.0, 1.0]), 5, None],
)
async def test_slot_lists_must_be_lists_of_integers(side: Any) -> None:
    with anyio.fail_after(20):
        async with kvactors.open(small_config()) as kv:
            with pytest.raises(TensorSpecError):
                await kv.store([1, 2], side)
            with pytest.raises(TensorSpecError):
                await kv.load([1, 2], side)
            assert (await kv.stats()).policy.tiers["cpu"].used == 0


@pytest.mark.parametrize("keys", [b"\x28\x29", "ab", 5, None, {1, 2}, (k for k in [1, 2])])
async def test_key_lists_must_be_lists_or_tuples(keys: Any) -> None:
    with anyio.fail_after(20):
        async with kvactors.open(small_config()) as kv:
            with pytest.raises(InvalidKeyError, match="list or tuple"):
                await kv.store(keys, [0, 1])
            with pytest.raises(InvalidKeyError):
                await kv.lookup(keys)
            with pytest.raises(InvalidKeyError):
                await kv.load(keys, [0, 1])
            with pytest.raises(InvalidKeyError):
                kv.prefetch(keys)
            with pytest.raises(InvalidKeyError):
                kv.submit_store(keys, [0, 1])
            assert (await kv.stats()).policy.tiers["cpu"].used == 0
            # Tuples and numpy-free int subclasses of lists are fine.
            fill(kv, [40, 41], [0, 1])
            assert await kv.store((40, 41), range(2)) == kvactors.StoreResult(2, 0)


async def test_sparse_grad_tensors_and_a_non_bool_partial_are_refused() -> None:
    with anyio.fail_after(20):
        async with kvactors.open(small_config()) as kv:
            fill(kv, [1], [0])
            await kv.store([1], [0])
            sparse = torch.zeros(1, BB, dtype=torch.uint8).to_sparse()
            with pytest.raises(TensorSpecError, match="dense"):
                await kv.load([1], sparse)
            with pytest.raises(TensorSpecError, match="dense"):
                await kv.store([2], sparse)
            grad = torch.zeros(1, BB // 4, dtype=torch.float32, requires_grad=True)
            with pytest.raises(TensorSpecError, match="grad"):
                await kv.load([1], grad)
            with pytest.raises(TensorSpecError, match="partial"):
                await kv.load([1], [5], partial="no")  # type: ignore[arg-type]
            assert (await settled(kv)).policy.tiers["cpu"].pinned == 0


async def test_an_unusable_destination_device_is_refused() -> None:
    with anyio.fail_after(20):
        async with kvactors.open(small_config()) as kv:
            fill(kv, [1], [0])
            await kv.store([1], [0])
            with pytest.raises(TensorSpecError, match="meta"):
                await kv.load([1], torch.empty(1, BB, dtype=torch.uint8, device="meta"))
            with pytest.raises(TensorSpecError, match="meta"):
                await kv.store([2], torch.empty(1, BB, dtype=torch.uint8, device="meta"))
            assert (await settled(kv)).policy.tiers["cpu"].used == 1


def test_config_refuses_a_negative_event_buffer_and_huge_tiers() -> None:
    with pytest.raises(ConfigError, match="event_buffer"):
        Config(event_buffer=-1)
    with pytest.raises(ConfigError, match="event_buffer"):
        Config.from_dict({"event_buffer": -1})
    with pytest.raises(ConfigError, match=r"nvme\.num_blocks"):
        Config.from_dict({"nvme": {"num_blocks": 2**31}})
    with pytest.raises(ConfigError, match="num_blocks"):
        NVMeConfig(num_blocks=2**31)


async def test_a_typed_error_leaves_the_block_as_itself() -> None:
    """Not an exception group: ``except KVActorsError`` catches it."""
    with anyio.fail_after(20):
        with pytest.raises(InvalidKeyError) as info:
            async with kvactors.open(small_config()) as kv:
                await kv.lookup(["not a key"])  # type: ignore[list-item]
        assert isinstance(info.value, KVActorsError)
        caught: list[KVActorsError] = []
        try:
            async with kvactors.open(small_config()) as kv:
                raise TensorSpecError("mine")
        except KVActorsError as exc:
            caught.append(exc)
        assert [str(e) for e in caught] == ["mine"]


@pytest.mark.parametrize("metrics", [False, True])
async def test_an_exception_group_of_the_callers_own_leaves_the_block_as_itself(
    metrics: bool,
) -> None:
    """The cache takes off only the groups its own task groups add: a group the
    body raises (one error or several, or one from the caller's task group)
    leaves as that same object."""
    cfg = small_config(metrics=MetricsConfig(port=0)) if metrics else small_config()
    errors: list[BaseException] = [
        ExceptionGroup("mine", [ValueError("v")]),
        ExceptionGroup("two", [ValueError("a"), KeyError("b")]),
        ValueError("plain"),
    ]
    with anyio.fail_after(20):
        for error in errors:
            with pytest.raises(type(error)) as info:
                async with kvactors.open(cfg):
                    raise error
            assert info.value is error

        async def child() -> None:
            raise ValueError("child")

        with pytest.raises(ExceptionGroup) as group:
            async with kvactors.open(cfg), anyio.create_task_group() as tg:
                tg.start_soon(child)
        assert [str(e) for e in group.value.exceptions] == ["child"]


# -- 9. start-up sizes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"cpu": {"num_blocks": 1_600_000}, "block_bytes": 65536}, r"cpu\.num_blocks"),  # 100 GiB
        ({"gpu": {"num_blocks": 4, "device": "cpu"}, "block_bytes": 2**40}, r"gpu\.num_blocks"),
        ({"nvme": {"num_blocks": 2**30}, "block_bytes": 4096}, r"nvme\.num_blocks"),
    ],
)
async def test_pools_too_large_for_the_machine_are_refused_naming_the_field(
    changes: dict[str, Any], field: str, tmp_path: Path
) -> None:
    changes = dict(changes)
    nvme = changes.pop("nvme", {"num_blocks": 16})
    cfg = small_config(**changes, nvme={**nvme, "directory": str(tmp_path), "backend": "posix"})
    with anyio.fail_after(20):
        with pytest.raises(ConfigError, match=field):
            async with kvactors.open(cfg):
                pass
        # Nothing was left open: the same directory opens at once.
        good = small_config(nvme={"num_blocks": 16, "directory": str(tmp_path), "backend": "posix"})
        async with kvactors.open(good) as kv:
            fill(kv, [1], [0])
            assert await kv.store([1], [0]) == kvactors.StoreResult(1, 0)


# -- 2. what a store result promises ------------------------------------------------------


async def test_store_result_says_which_blocks_are_durable(tmp_path: Path) -> None:
    cfg = small_config(
        write_mode="write_through",
        nvme={"num_blocks": 16, "directory": str(tmp_path), "backend": "posix"},
    )
    with anyio.fail_after(20):
        async with kvactors.open(cfg) as kv:
            fill(kv, [1, 2, 3, 4], [0, 1, 2, 3])
            assert await kv.store([1, 2], [0, 1]) == kvactors.StoreResult(2, 0, [1, 2])
            store: Any = kv.medium("nvme")
            store.faults = InjectedFaults(0, p_write=1.0)  # the disk is full
            result = await kv.store([3, 4], [2, 3])
            assert result == kvactors.StoreResult(2, 0, [])  # in CPU only
            assert (await kv.lookup([3, 4])).tiers == ["cpu", "cpu"]
            store.faults = None
            again = await kv.store([1, 3], [0, 2])
            assert again == kvactors.StoreResult(0, 2, [1])
        # What survives a restart is exactly what was reported durable.
        async with kvactors.open(cfg) as kv:
            assert (await kv.lookup([1, 2])).tiers == ["nvme", "nvme"]
            assert (await kv.lookup([3])).hits == 0
            assert (await kv.lookup([4])).hits == 0


async def test_write_back_and_temporary_nvme_report_nothing_durable() -> None:
    with anyio.fail_after(20):
        async with kvactors.open(small_config(write_mode="write_through")) as kv:
            fill(kv, [1], [0])
            assert await kv.store([1], [0]) == kvactors.StoreResult(1, 0, [])
        async with kvactors.open(small_config()) as kv:
            fill(kv, [1], [0])
            assert await kv.store([1], [0]) == kvactors.StoreResult(1, 0, [])


# -- 7. cancellation and concurrency ------------------------------------------------------


class Gate:
    """Holds every copy of ``transfers.move`` of the chosen direction until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, direction: str) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        original = transfers.move
        from kvactors.cache import tier_actor

        def held(src: Any, dst: Any, *rest: Any) -> None:
            if f"{src.name}->{dst.name}" == direction:
                self.entered.set()
                self.gate.wait(10)
            original(src, dst, *rest)

        monkeypatch.setattr(tier_actor, "move", held)

    async def wait_entered(self) -> None:
        with anyio.fail_after(5):
            while not self.entered.is_set():
                await anyio.sleep(0.005)


async def test_a_write_through_store_cancelled_during_its_nvme_write_is_never_readable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = small_config(
        write_mode="write_through",
        nvme={"num_blocks": 16, "directory": str(tmp_path), "backend": "posix"},
    )
    with anyio.fail_after(20):
        async with kvactors.open(cfg) as kv:
            gate = Gate(monkeypatch, "cpu->nvme")
            fill(kv, [1, 2], [0, 1])
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(kv.store, [1, 2], [0, 1])
                    await gate.wait_entered()
                    threading.Timer(0.1, gate.gate.set).start()
                    scope.cancel()
            # The write to NVMe completed after the cancellation: still not served.
            assert (await kv.lookup([1, 2])).hits == 0
            stats = await settled(kv)
            assert stats.policy.tiers["nvme"].used == stats.policy.tiers["cpu"].used == 0
        async with kvactors.open(cfg) as kv:
            assert (await kv.lookup([1, 2])).hits == 0  # nor after a restart


@pytest.mark.parametrize("call", ["store", "load"])
async def test_a_call_cancelled_during_its_copy_of_the_callers_tensor_returns_after_it(
    call: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/api.md, Cancellation: a cancelled call returns once the transfer in
    flight has ended, so afterwards kvactors neither reads ``src`` nor writes
    ``dst``: the copy of the caller's tensor (in a worker thread, inline_bytes=0)
    has returned when the cancelled call does, and nothing stays pinned."""
    direction = "tensor->cpu" if call == "store" else "cpu->tensor"
    ended = threading.Event()
    gate = threading.Event()
    entered = threading.Event()
    original = transfers.move
    from kvactors.cache import tier_actor

    def held(src: Any, dst: Any, *rest: Any) -> None:
        if f"{src.name}->{dst.name}" == direction:
            entered.set()
            gate.wait(10)
            original(src, dst, *rest)
            ended.set()
        else:
            original(src, dst, *rest)

    mine = torch.full((2, BB), 7, dtype=torch.uint8)
    with anyio.fail_after(20):
        async with kvactors.open(small_config(inline_bytes=0)) as kv:
            if call == "load":
                assert await kv.store([1, 2], mine.clone()) is not None
            monkeypatch.setattr(tier_actor, "move", held)
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    if call == "store":
                        tg.start_soon(kv.store, [1, 2], mine)
                    else:
                        tg.start_soon(kv.load, [1, 2], mine)
                    with anyio.fail_after(5):
                        while not entered.is_set():
                            await anyio.sleep(0.005)
                    threading.Timer(0.2, gate.set).start()
                    scope.cancel()
            assert scope.cancelled_caught
            assert ended.is_set()  # the copy had returned before the call did
            stats = await settled(kv)
            for tier in stats.policy.tiers.values():
                assert tier.pinned == tier.being_written == 0
            if call == "store":
                assert (await kv.lookup([1, 2])).hits == 0  # a cancelled store stores nothing
            else:
                assert (await kv.lookup([1, 2])).hits == 2  # a cancelled load drops nothing


@pytest.mark.parametrize("first", ["completes", "is cancelled"])
async def test_a_second_store_of_a_key_being_written_waits_for_the_first(
    first: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not reported present while the first store writes it; if the first store
    is cancelled, the second one stores the key."""
    with anyio.fail_after(20):
        async with kvactors.open(small_config(inline_bytes=0)) as kv:
            gate = Gate(monkeypatch, "gpu->cpu")
            fill(kv, [1], [0])
            fill(kv, [1], [1])
            second: list[Any] = []
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(kv.store, [1], [0])
                    await gate.wait_entered()

                    async def again() -> None:
                        with anyio.CancelScope(shield=True):
                            second.append(await kv.store([1], [1]))

                    tg.start_soon(again)
                    await anyio.sleep(0.05)
                    assert not second  # waiting, not "present"
                    if first == "is cancelled":
                        scope.cancel()
                    gate.gate.set()
            with anyio.fail_after(5):
                while not second:
                    await anyio.sleep(0.01)
            if first == "completes":
                assert second == [kvactors.StoreResult(0, 1)]
            else:
                assert second == [kvactors.StoreResult(1, 0)]
            assert (await kv.lookup([1])).hits == 1
            await kv.load([1], [5])
            assert torch.equal(rows(kv, [5]), block_bytes_for([1], BB, CPU))


@pytest.mark.parametrize("partial", [False, True])
async def test_a_block_being_demoted_is_loaded_once_it_lands(
    partial: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load of blocks whose demotion CPU -> NVMe is in flight waits for it and
    reads them from NVMe (they are in the cache all along); a store of them
    meanwhile waits too, then finds them present."""
    with anyio.fail_after(20):
        async with kvactors.open(small_config(cpu={"num_blocks": 4})) as kv:
            old, new = [0, 1, 2, 3], [4, 5, 6, 7]
            fill(kv, old + new, list(range(8)))
            await kv.store(old, [0, 1, 2, 3])
            gate = Gate(monkeypatch, "cpu->nvme")
            loaded: list[kvactors.LoadResult] = []
            stored: list[Any] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(kv.store, new, [4, 5, 6, 7])  # evicts old: demoted
                await gate.wait_entered()
                assert (await kv.lookup(old)).hits == 0  # in no tier ready meanwhile

                async def load() -> None:
                    loaded.append(await kv.load(old[:2], [20, 21], partial=partial))

                async def store() -> None:
                    stored.append(await kv.store(old[2:], [2, 3]))

                tg.start_soon(load)
                tg.start_soon(store)
                await anyio.sleep(0.05)
                assert not loaded  # waiting for the demotion
                assert not stored
                gate.gate.set()
            assert loaded[0].tiers == ["nvme", "nvme"]
            assert torch.equal(rows(kv, [20, 21]), block_bytes_for(old[:2], BB, CPU))
            assert stored == [kvactors.StoreResult(0, 2)]
            stats = await settled(kv)
            assert stats.policy.demotions_lost == 0


@pytest.mark.parametrize("call", ["store", "load"])
async def test_a_cancellation_landing_as_the_plan_is_made_leaves_nothing_held(
    call: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the policy actor's mailbox, a caller cancelled while its plan is
    being made (the reply arrives anyway) still has that plan completed: no pin,
    no block left being written, and the cancelled store is not readable."""
    from kvactors.cache.policy_actor import PolicyActor

    monkeypatch.setattr(PolicyActor, "idle", property(lambda self: False))  # mailbox path
    scope = anyio.CancelScope()
    name = "prepare_store" if call == "store" else "prepare_load"
    original = getattr(PolicyActor, name)

    def cancelling(self: PolicyActor, keys: list[Any], **kw: Any) -> Any:
        plan = original(self, keys, **kw)
        scope.cancel()  # lands while the handler runs: its reply is set regardless
        return plan

    with anyio.fail_after(20):
        async with kvactors.open(small_config(nvme=None)) as kv:
            fill(kv, [1, 2], [0, 1])
            if call == "load":
                await kv.store([1, 2], [0, 1])
            monkeypatch.setattr(PolicyActor, name, cancelling)
            with scope:
                if call == "store":
                    await kv.store([1, 2], [0, 1])
                else:
                    await kv.load([1, 2], [5, 6])
            assert scope.cancelled_caught
            monkeypatch.setattr(PolicyActor, name, original)
            stats = await settled(kv)
            assert stats.policy.tiers["cpu"].used == (2 if call == "load" else 0)
            assert (await kv.lookup([1, 2])).hits == (2 if call == "load" else 0)
            if call == "store":
                assert await kv.store([1, 2], [0, 1]) == kvactors.StoreResult(2, 0)


class CorruptOne:
    """A device that returns bad bytes for one block, wherever it is read."""

    def __init__(self, key: int) -> None:
        self.head = bytes(block_bytes_for([key], BB, CPU)[0, :16].tolist())
        self.hits = 0

    def on_io(self, write: bool, stripe: int, offset: int, nbytes: int) -> int:
        return 0

    def on_read(self, buffers: list[memoryview]) -> None:
        for buf in buffers:
            if bytes(buf[:16]) == self.head:
                self.hits += 1
                buf[0] ^= 0xFF


async def test_concurrent_partial_loads_over_a_corrupt_block_return_the_good_prefix() -> None:
    with anyio.fail_after(30):
        async with kvactors.open(small_config(cpu={"num_blocks": 4})) as kv:
            keys = list(range(8))
            fill(kv, keys, keys)
            for i in range(0, 8, 4):
                await kv.store(keys[i : i + 4], keys[i : i + 4])
            for i in range(4, 8):  # make room: blocks 0..3 live in NVMe only
                assert (await kv.lookup([i])).tiers == ["cpu"]
            store: Any = kv.medium("nvme")
            store.faults = CorruptOne(2)
            results: list[int] = []

            async def loader(c: int) -> None:
                dst = list(range(10 + 4 * c, 14 + 4 * c))
                got = await kv.load(keys[:4], dst, partial=True)
                n = len(got.tiers)
                assert torch.equal(rows(kv, dst[:n]), block_bytes_for(keys[:n], BB, CPU))
                results.append(n)

            async with anyio.create_task_group() as tg:
                for c in range(8):
                    tg.start_soon(loader, c)
            assert results == [2] * 8
            assert store.faults.hits >= 1
            stats = await settled(kv)
            assert stats.policy.corrupted == 1


async def test_leaving_the_block_waits_for_futures_submitted_just_before() -> None:
    futures: list[kvactors.Future[Any]] = []
    with anyio.fail_after(20):
        async with kvactors.open(small_config()) as kv:
            keys = list(range(10))
            fill(kv, keys, keys)
            futures = [kv.submit_store([k], [k]) for k in keys]
        assert all(f.done() for f in futures)
        assert [f.result() for f in futures] == [kvactors.StoreResult(1, 0)] * 10
        with pytest.raises(ActorClosed):
            await kv.lookup([1])


async def test_an_error_leaving_the_block_still_waits_for_submitted_futures() -> None:
    """Leaving the block with an error ends the calls of ``submit_*`` as a plain
    exit does (they are not cancelled); leaving it by cancellation cancels them."""
    futures: list[kvactors.Future[Any]] = []
    keys = list(range(6))  # fewer than the CPU tier holds

    async def submit_then_fail() -> None:
        nonlocal futures
        async with kvactors.open(small_config(inline_bytes=0)) as kv:
            fill(kv, keys, keys)
            futures = [kv.submit_store([k], [k]) for k in keys]
            raise ValueError("boom")

    with anyio.fail_after(20):
        with pytest.raises(ValueError, match="boom"):
            await submit_then_fail()
        assert [f.result() for f in futures] == [kvactors.StoreResult(1, 0)] * 6

        with anyio.CancelScope() as scope:
            async with kvactors.open(small_config(inline_bytes=0)) as kv:
                fill(kv, keys, keys)
                futures = [kv.submit_store([k], [k]) for k in keys]
                scope.cancel()
                await anyio.sleep(5)
        assert scope.cancelled_caught
        assert all(isinstance(f.exception(), ActorClosed) for f in futures)


@pytest.mark.parametrize("write_mode", ["write_back", "write_through"])
@pytest.mark.parametrize("close_after", [0.0, 0.002, 0.02])
async def test_calls_from_other_tasks_while_the_cache_closes_succeed_or_raise_actor_closed(
    write_mode: str, close_after: float
) -> None:
    """Tasks outside the block keep calling every method while it closes: each
    call succeeds or raises ``ActorClosed`` (never another error, never a
    hang), and ``prefetch`` answers ``False`` once closed."""
    outcomes: dict[str, int] = {}
    cfg = small_config(
        inline_bytes=0, max_inflight=2, mailbox_size=2, write_mode=write_mode, cpu={"num_blocks": 3}
    )
    with anyio.fail_after(30):
        async with anyio.create_task_group() as outer, kvactors.open(cfg) as kv:

            async def hammer(lane: int) -> None:
                rnd = random.Random(lane)
                slots = list(range(lane * 4, lane * 4 + 3))
                while True:
                    keys = rnd.sample(range(12), 3)
                    op = rnd.choice(["store", "load", "lookup", "stats", "events", "submit"])
                    try:
                        if op == "store":
                            await kv.store(keys, block_bytes_for(keys, BB, CPU))
                        elif op == "load":
                            got = await kv.load(keys, slots, partial=True)
                            n = len(got.tiers)
                            assert torch.equal(
                                rows(kv, slots[:n]), block_bytes_for(keys[:n], BB, CPU)
                            )
                        elif op == "lookup":
                            await kv.lookup(keys)
                        elif op == "stats":
                            await kv.stats()
                        elif op == "events":
                            (await kv.events()).close()
                        else:
                            fut = kv.submit_load(keys, slots, partial=True)
                            await fut
                        kv.prefetch(keys)
                    except ActorClosed:
                        outcomes["closed"] = outcomes.get("closed", 0) + 1
                        assert kv.prefetch(keys) is False
                        return
                    outcomes["ok"] = outcomes.get("ok", 0) + 1

            for lane in range(8):
                outer.start_soon(hammer, lane)
            await anyio.sleep(close_after)
    assert outcomes["closed"] == 8


async def test_the_copy_threads_belong_to_one_cache_and_close_with_it() -> None:
    """Large host copies are split over the cache's own threads: none is left
    once the cache closes, and two caches never share them."""

    def ours() -> set[str]:
        return {t.name for t in threading.enumerate() if t.name.startswith("kvactors")}

    before = ours()
    cfg = small_config(block_bytes=2**20, gpu={"num_blocks": 8, "device": "cpu"}, nvme=None)
    with anyio.fail_after(30):
        async with kvactors.open(cfg) as kv:
            data = torch.randint(0, 256, (8, 2**20), dtype=torch.uint8)
            kv.gpu_pool.write_rows(list(range(8)), data)
            await kv.store(list(range(8)), list(range(8)))
            out = torch.empty(8, 2**20, dtype=torch.uint8)
            await kv.load(list(range(8)), out)
            assert torch.equal(out, data)
            started = ours() - before
            # The split copies ran on the cache's copy threads, the transfers on
            # the CPU tier's own threads (8 MiB per call: not inline).
            assert any(name.startswith("kvactors-copy") for name in started)
            assert any(name.startswith("kvactors-cpu-") for name in started)
    assert ours() == before
