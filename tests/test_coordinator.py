"""End-to-end scenarios through ``kvactors.open``: real bytes across GPU pool, CPU and NVMe."""

from __future__ import annotations

import re
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import torch

import kvactors
from _served import BB, CPU, drain, fill, rows, settled, small_config
from kvactors.cache import tier_actor, transfers
from kvactors.cli.demo import block_bytes_for
from kvactors.config import Config
from kvactors.errors import (
    ActorClosed,
    BlockNotFoundError,
    ConfigError,
    InvalidKeyError,
    TensorSpecError,
    TierError,
    TierFailed,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def kv() -> AsyncIterator[kvactors.KVCache]:
    with anyio.fail_after(20):
        async with kvactors.open(small_config()) as cache:
            yield cache


async def test_store_demote_promote_and_load_back_byte_exact(kv: kvactors.KVCache) -> None:
    """20 blocks into a CPU tier of 8: the 12 least recent are demoted to NVMe.
    Loading all 20 returns every byte; with all 8 CPU blocks pinned by that load
    the NVMe ones are read directly. A load of 4 NVMe blocks alone promotes them,
    demoting the 4 least recent CPU blocks in turn."""
    events: Any = await kv.events()
    keys = list(range(100, 120))
    fill(kv, keys, list(range(20)))
    for i in range(0, 20, 4):  # several stores, so earlier blocks age out of CPU
        res = await kv.store(keys[i : i + 4], list(range(i, i + 4)))
        assert res == kvactors.StoreResult(stored=4, present=0)
    found = await kv.lookup(keys)
    assert found.hits == 20
    assert found.tiers == ["nvme"] * 12 + ["cpu"] * 8
    dst = list(range(32, 52))
    loaded = await kv.load(keys, dst)
    assert loaded.tiers == ["nvme"] * 12 + ["cpu"] * 8
    assert torch.equal(rows(kv, dst), block_bytes_for(keys, BB, CPU))
    stats = await settled(kv)
    assert (stats.policy.demoted, stats.policy.promoted) == (12, 0)
    dst = list(range(52, 56))
    assert (await kv.load(keys[:4], dst)).tiers == ["nvme"] * 4
    assert torch.equal(rows(kv, dst), block_bytes_for(keys[:4], BB, CPU))
    found = await kv.lookup(keys)
    assert found.tiers[:4] == ["cpu"] * 4
    stats = await settled(kv)
    assert (stats.policy.promoted, stats.policy.demoted) == (4, 16)  # 4 CPU victims written down
    assert stats.failed_loads == stats.failed_stores == 0
    with events:
        seen = drain(events)
    kinds = {e.kind for e in seen}
    assert {"stored", "removed", "demoted", "promoted"} <= kinds
    demoted = [k for e in seen if e.kind == "demoted" for k in e.keys]
    assert sorted(demoted)[:12] == keys[:12]


async def test_store_skips_present_keys_and_user_tensors_round_trip(kv: kvactors.KVCache) -> None:
    keys = [b"a" * 16, b"b" * 16, b"c" * 16]
    src = torch.randint(0, 256, (3, BB), dtype=torch.uint8)
    assert await kv.store(keys, src) == kvactors.StoreResult(3, 0)
    assert await kv.store([*keys[:2], b"d"], torch.zeros(3, BB, dtype=torch.uint8)) == (
        kvactors.StoreResult(1, 2)
    )
    out = torch.empty(3, BB, dtype=torch.uint8)
    await kv.load(keys, out)
    assert torch.equal(out, src)
    # Any dtype works when the bytes add up: 3 blocks of 1024 float32.
    as_float = torch.empty(3, BB // 4, dtype=torch.float32)
    await kv.load(keys, as_float)
    assert torch.equal(as_float.view(torch.uint8).view(3, BB), src)


async def test_partial_load_stops_at_the_first_missing_key(kv: kvactors.KVCache) -> None:
    fill(kv, [1, 2, 3], [0, 1, 2])
    await kv.store([1, 2, 3], [0, 1, 2])
    res = await kv.load([1, 2, 99, 3], [10, 11, 12, 13], partial=True)
    assert res.tiers == ["cpu", "cpu"]
    assert torch.equal(rows(kv, [10, 11]), block_bytes_for([1, 2], BB, CPU))
    with pytest.raises(BlockNotFoundError, match="99"):
        await kv.load([1, 99], [10, 11])
    await settled(kv)


async def test_prefetch_promotes_nvme_blocks_to_cpu(kv: kvactors.KVCache) -> None:
    keys = list(range(16))
    fill(kv, keys, keys)
    for i in range(0, 16, 8):
        await kv.store(keys[i : i + 8], keys[i : i + 8])
    assert (await kv.lookup([0, 1])).tiers == ["nvme", "nvme"]
    assert kv.prefetch([0, 1])
    with anyio.fail_after(5):
        while (await kv.lookup([0, 1])).tiers != ["cpu", "cpu"]:
            await anyio.sleep(0.01)
    assert (await kv.stats()).policy.promoted == 2


async def test_submit_returns_pollable_futures(kv: kvactors.KVCache) -> None:
    fill(kv, [7, 8], [0, 1])
    fut = kv.submit_store([7, 8], [0, 1])
    with anyio.fail_after(5):
        while not fut.done():
            await anyio.lowlevel.checkpoint()
    assert fut.result() == kvactors.StoreResult(2, 0)
    load = kv.submit_load([7, 8], [5, 6])
    assert (await load).tiers == ["cpu", "cpu"]
    assert torch.equal(rows(kv, [5, 6]), block_bytes_for([7, 8], BB, CPU))
    bad = kv.submit_load([404], [9])
    with pytest.raises(BlockNotFoundError):
        await bad


class SlowWrites:
    """Makes every pool-to-pool copy wait until released, to cancel callers mid-transfer."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        original = transfers.copy_rows

        def slow(*args: Any) -> None:
            self.entered.set()
            self.gate.wait(10)
            original(*args)

        monkeypatch.setattr(transfers, "copy_rows", slow)


async def wait_entered(slow: SlowWrites) -> None:
    with anyio.fail_after(5):
        while not slow.entered.is_set():
            await anyio.sleep(0.005)


@pytest.mark.parametrize("when", ["before", "during"])
async def test_cancelled_store_leaves_nothing_behind(
    when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store cancelled while its transfer is queued or running completes as failed:
    no pin, no not-ready block, and the key is not served."""
    # inline_bytes=0: copies run in threads, so they can be slow.
    config = small_config(cpu={"num_blocks": 8, "threads": 1}, inline_bytes=0)
    with anyio.fail_after(20):
        async with kvactors.open(config) as kv:
            slow = SlowWrites(monkeypatch)
            fill(kv, [1, 2], [0, 1])
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(kv.store, [1, 2], [0, 1])
                    if when == "during":
                        await wait_entered(slow)
                    else:
                        await anyio.lowlevel.checkpoint()
                    # The cancelled store returns only once its copy has ended,
                    # which the timer allows a little later.
                    threading.Timer(0.2, slow.gate.set).start()
                    scope.cancel()
            assert slow.gate.is_set() or when == "before"
            slow.gate.set()
            stats = await settled(kv)
            assert stats.policy.tiers["cpu"].used == 0
            assert stats.policy.tiers["cpu"].free == 8
            assert (await kv.lookup([1, 2])).hits == 0
            # The cache keeps working afterwards.
            assert await kv.store([1, 2], [0, 1]) == kvactors.StoreResult(2, 0)


async def test_cancelled_load_releases_its_pins(monkeypatch: pytest.MonkeyPatch) -> None:
    with anyio.fail_after(20):
        async with kvactors.open(small_config(inline_bytes=0)) as kv:
            fill(kv, [1, 2], [0, 1])
            await kv.store([1, 2], [0, 1])
            slow = SlowWrites(monkeypatch)
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(kv.load, [1, 2], [10, 11])
                    await wait_entered(slow)
                    assert (await kv.stats()).policy.tiers["cpu"].pinned == 2
                    threading.Timer(0.2, slow.gate.set).start()
                    scope.cancel()
            # The cancelled load returned only after its copy into dst ended.
            assert slow.gate.is_set()
            stats = await settled(kv)
            assert stats.policy.tiers["cpu"].pinned == 0
            assert (await kv.lookup([1, 2])).hits == 2


async def test_many_cancelled_callers_leave_consistent_tiers() -> None:
    with anyio.fail_after(30):
        async with kvactors.open(small_config()) as kv:
            keys = list(range(40))
            fill(kv, keys, keys)

            async def churn(i: int) -> None:
                with anyio.move_on_after(0.001 * (i % 5)):
                    await kv.store(keys[i : i + 3], keys[i : i + 3])
                    await kv.load(keys[i : i + 3], [40 + j for j in range(3)], partial=True)

            async with anyio.create_task_group() as tg:
                for i in range(0, 36):
                    tg.start_soon(churn, i)
            stats = await settled(kv)
            for tier in stats.policy.tiers.values():
                assert tier.used + tier.free == tier.capacity


async def test_crashed_tier_reaches_callers_and_the_rest_keeps_working() -> None:
    with anyio.fail_after(20):
        async with kvactors.open(small_config()) as kv:
            keys = list(range(12))
            fill(kv, keys, keys)
            await kv.store(keys[:8], keys[:8])
            await kv.store(keys[8:], keys[8:])  # demotes 4 blocks to NVMe
            assert (await kv.lookup(keys)).tiers[:4] == ["nvme"] * 4
            # The device goes away: every I/O of the NVMe medium fails from now on.
            store: Any = kv.medium("nvme")

            def dead(*args: Any) -> None:
                raise TierFailed("device lost")

            store.read_buffers = store.write_buffers = dead
            with pytest.raises(TierError, match="device lost"):
                await kv.load(keys[:1], [20])
            stats = await settled(kv)
            assert stats.policy.failed == ["nvme"]
            assert stats.tiers["nvme"].crashed == "device lost"
            # CPU blocks still load, and stores still land in CPU.
            # (the lookup above made 4 the most recent CPU block, 11 the least:
            # the failed promotion's victim)
            await kv.load(keys[4:8], [30, 31, 32, 33])
            assert torch.equal(rows(kv, [30, 31, 32, 33]), block_bytes_for(keys[4:8], BB, CPU))
            fill(kv, [50], [50])
            assert await kv.store([50], [50]) == kvactors.StoreResult(1, 0)
            assert (await kv.lookup(keys)).hits == 0  # NVMe blocks no longer count


async def test_shutdown_with_requests_in_flight_fails_them_cleanly() -> None:
    futures: list[kvactors.Future[Any]] = []
    with anyio.fail_after(20):
        async with kvactors.open(small_config(max_inflight=1, mailbox_size=2)) as kv:
            keys = list(range(30))
            fill(kv, keys, keys)
            futures = [kv.submit_store([k], [k]) for k in keys]
            await anyio.lowlevel.checkpoint()
    assert all(f.done() for f in futures)
    outcomes = {type(f.exception()).__name__ if f.exception() else "ok" for f in futures}
    assert outcomes <= {"ok", "ActorClosed"}
    with pytest.raises(ActorClosed):
        await kv.lookup([1])
    assert kv.submit_store([1], [1]).exception() is not None


async def test_bad_input_gets_typed_errors_and_changes_nothing(kv: kvactors.KVCache) -> None:
    with pytest.raises(InvalidKeyError, match="str"):
        await kv.store(["x"], [0])  # type: ignore[list-item]
    with pytest.raises(InvalidKeyError, match="twice"):
        await kv.store([1, 1], [0, 1])
    with pytest.raises(InvalidKeyError, match="no keys"):
        await kv.lookup([])
    with pytest.raises(TensorSpecError, match="bytes"):
        await kv.store([1], torch.zeros(1, BB - 1, dtype=torch.uint8))
    with pytest.raises(TensorSpecError, match="first dimension"):
        await kv.store([1, 2], torch.zeros(1, 2 * BB, dtype=torch.uint8))
    with pytest.raises(TensorSpecError, match="out of range"):
        await kv.store([1], [10_000])
    with pytest.raises(TensorSpecError, match="twice"):
        await kv.store([1, 2], [3, 3])
    stats = await kv.stats()
    assert stats.policy.tiers["cpu"].used == 0


def test_config_from_toml_names_the_bad_field(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('block_bytes = 8192\nwrite_mode = "write_through"\n[cpu]\nnum_blocks = 16\n')
    cfg = Config.from_toml(good)
    assert (cfg.block_bytes, cfg.cpu.num_blocks, cfg.write_mode) == (8192, 16, "write_through")
    bad = tmp_path / "bad.toml"
    bad.write_text("[nvme]\nthreads = 0\n")
    with pytest.raises(ConfigError, match=r"nvme\.threads"):
        Config.from_toml(bad)
    with pytest.raises(ConfigError, match=r"nvme\.stripes"):
        Config.from_dict({"nvme": {"stripes": 0}})
    with pytest.raises(ConfigError, match="policy"):
        Config.from_dict({"cpu": {"policy": "fifo"}})


async def test_write_through_puts_every_stored_block_in_nvme_at_once() -> None:
    with anyio.fail_after(20):
        async with kvactors.open(small_config(write_mode="write_through")) as kv:
            fill(kv, [1, 2, 3], [0, 1, 2])
            await kv.store([1, 2, 3], [0, 1, 2])
            stats = await settled(kv)
            assert stats.policy.tiers["nvme"].used == 3
            assert stats.tiers["nvme"].transfers["cpu->nvme"].bytes == 3 * BB


async def test_nvme_directory_is_used_and_kept(tmp_path: Path) -> None:
    config = small_config(nvme={"num_blocks": 16, "directory": str(tmp_path), "backend": "posix"})
    with anyio.fail_after(20):
        async with kvactors.open(config) as kv:
            fill(kv, [1], [0])
            await kv.store([1], [0])
    assert any(tmp_path.iterdir())


@pytest.mark.parametrize("inline_bytes", [0, 256 * 1024])
async def test_inline_and_threaded_copies_move_the_same_bytes(inline_bytes: int) -> None:
    """``inline_bytes=0`` runs every copy in a worker thread, the default runs
    these small ones on the event loop; either way every byte comes back,
    through GPU-pool slots, user tensors, demotions and NVMe promotions."""
    with anyio.fail_after(20):
        async with kvactors.open(small_config(inline_bytes=inline_bytes)) as kv:
            keys = list(range(200, 216))
            fill(kv, keys, list(range(16)))
            for i in range(0, 16, 4):  # 16 blocks into a CPU tier of 8: 8 demoted
                await kv.store(keys[i : i + 4], list(range(i, i + 4)))
            src = torch.randint(0, 256, (2, BB), dtype=torch.uint8)
            await kv.store([b"x", b"y"], src)
            dst = list(range(20, 36))
            assert (await kv.load(keys, dst)).tiers.count("nvme") >= 8
            assert torch.equal(rows(kv, dst), block_bytes_for(keys, BB, CPU))
            out = torch.empty(2, BB, dtype=torch.uint8)
            await kv.load([b"x", b"y"], out)
            assert torch.equal(out, src)
            stats = await settled(kv)
            assert stats.failed_loads == stats.failed_stores == 0


async def test_file_io_never_runs_on_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Copies that touch the NVMe file run in worker threads, whatever their
    size; small memory-to-memory copies run on the event loop thread."""
    on_loop: dict[bool, list[bool]] = {True: [], False: []}
    original = tier_actor.move

    def recording(src: Any, dst: Any, *rest: Any) -> None:
        touches_file = src.rows is None or dst.rows is None
        on_loop[touches_file].append(threading.current_thread() is threading.main_thread())
        original(src, dst, *rest)

    monkeypatch.setattr(tier_actor, "move", recording)
    config = small_config(cpu={"num_blocks": 4})
    with anyio.fail_after(20):
        async with kvactors.open(config) as kv:
            keys = list(range(12))
            fill(kv, keys, keys)
            for i in range(0, 12, 4):
                await kv.store(keys[i : i + 4], keys[i : i + 4])  # demotions to NVMe
            # 12 blocks, 4 CPU slots: reads straight from NVMe into the GPU pool.
            await kv.load(keys, list(range(20, 32)))
            assert torch.equal(rows(kv, list(range(20, 32))), block_bytes_for(keys, BB, CPU))
    assert on_loop[True]
    assert not any(on_loop[True])
    assert on_loop[False]
    assert all(on_loop[False])


@pytest.mark.parametrize("inline_bytes", [0, 256 * 1024])
async def test_cancelled_callers_leave_no_pins_with_inline_or_threaded_copies(
    inline_bytes: int,
) -> None:
    with anyio.fail_after(30):
        async with kvactors.open(small_config(inline_bytes=inline_bytes)) as kv:
            keys = list(range(40))
            fill(kv, keys, keys)
            for i in range(0, 40, 4):
                await kv.store(keys[i : i + 4], keys[i : i + 4])

            async def churn(i: int) -> None:
                with anyio.CancelScope() as scope:
                    if i % 2:
                        scope.cancel()  # cancelled before it even posts
                    await anyio.lowlevel.checkpoint()
                    await kv.load(keys[i : i + 3], [40 + i, 41 + i, 42 + i], partial=True)
                    await kv.store([1000 + i], [i])

            async with anyio.create_task_group() as tg:
                for i in range(0, 20):
                    tg.start_soon(churn, i)
                await anyio.lowlevel.checkpoint()
                tg.cancel_scope.cancel()  # the rest, wherever they are
            stats = await settled(kv)
            for tier in stats.policy.tiers.values():
                assert tier.pinned == tier.being_written == 0
                assert tier.used + tier.free == tier.capacity
            # Whatever is served is byte-exact.
            found = await kv.lookup(keys)
            dst = list(range(0, found.hits))
            await kv.load(keys[: found.hits], dst)
            assert torch.equal(rows(kv, dst), block_bytes_for(keys[: found.hits], BB, CPU))


@pytest.mark.parametrize(
    ("value", "message"),
    [(-1, "`int` >= 0"), (8 * 1024 * 1024, "`int` <= 4194304"), ("big", "Expected `int`")],
)
def test_inline_bytes_is_checked_and_named(value: object, message: str) -> None:
    assert Config().inline_bytes == 4 * 1024 * 1024
    assert Config.from_dict({"inline_bytes": 0}).inline_bytes == 0
    with pytest.raises(ConfigError, match=rf"inline_bytes: .*{re.escape(message)}"):
        Config.from_dict({"inline_bytes": value})
    with pytest.raises(ConfigError, match=r"inline_bytes: expected an int from 0 to 4194304"):
        Config(inline_bytes=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("max_inflight", [1, 32])
async def test_handshakes_in_the_callers_task_or_by_mailbox_leave_the_same_state(
    max_inflight: int,
) -> None:
    """With ``max_inflight=1`` and concurrent callers most handshakes wait in the
    coordinator's mailbox; with 32 each runs in its caller's task. The same
    requests leave the same blocks, bytes and counters either way."""
    with anyio.fail_after(20):
        async with kvactors.open(small_config(max_inflight=max_inflight)) as kv:
            keys = list(range(300, 316))
            fill(kv, keys, list(range(16)))
            async with anyio.create_task_group() as tg:
                for i in range(0, 8, 2):
                    tg.start_soon(kv.store, keys[i : i + 2], list(range(i, i + 2)))
            await kv.store(keys[8:], list(range(8, 16)))  # evicts, demotes 8
            # Concurrent loads of blocks in CPU (promotions of the others would
            # evict and demote blocks the next load names).
            async with anyio.create_task_group() as tg:
                for i in range(2, 4):
                    dst = list(range(20 + 4 * i, 24 + 4 * i))
                    tg.start_soon(kv.load, keys[4 * i : 4 * i + 4], dst)
            await kv.load(keys[:8], list(range(20, 28)))
            assert torch.equal(rows(kv, list(range(20, 36))), block_bytes_for(keys, BB, CPU))
            stats = await settled(kv)
            assert stats.policy.tiers["cpu"].used == 8
            assert stats.policy.demoted >= 8
            assert stats.latency["store"].count == 5
            assert stats.latency["load"].count == 3
            coord = next(a for a in stats.actors if a.name == "coordinator")
            assert (coord.handled, coord.failed) == (8, 0)


@asynccontextmanager
async def ticking() -> AsyncIterator[Callable[[], int]]:
    """A task that counts its turns while the body runs: how often the body's
    calls let other tasks run (the count, read through the yielded function)."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.lowlevel.checkpoint()
        yield lambda: ticks
        tg.cancel_scope.cancel()


async def test_every_call_yields_and_a_call_cancelled_before_it_runs_changes_nothing(
    kv: kvactors.KVCache,
) -> None:
    """Calls answered at once still let other tasks run (one checkpoint each),
    and a caller already cancelled stores nothing."""
    fill(kv, [1, 2], [0, 1])
    async with ticking() as ticks:
        before = ticks()
        for _ in range(5):
            await kv.store([1, 2], [0, 1])
            await kv.lookup([1, 2])
            await kv.load([1, 2], [5, 6])
        assert ticks() >= before + 15
    with anyio.CancelScope() as scope:
        scope.cancel()
        await kv.store([3], [2])
    assert (await kv.lookup([3])).hits == 0
    stats = await settled(kv)
    assert stats.policy.tiers["cpu"].used == 2


async def test_stats_and_events_yield_once_and_are_cancellation_points(
    kv: kvactors.KVCache,
) -> None:
    """``stats()`` and ``events()`` are calls like the others: a loop of them
    lets other tasks run, and a caller already cancelled gets no stream."""
    async with ticking() as ticks:
        before = ticks()
        for _ in range(5):
            await kv.stats()
            stream = await kv.events()
            stream.close()
        assert ticks() >= before + 10
    for call in (kv.stats, kv.events):
        with anyio.CancelScope() as scope:
            scope.cancel()
            await call()
        assert scope.cancelled_caught, call
    # Subscribed before the call yields: a store submitted just before is seen.
    fill(kv, [1], [0])
    fut = kv.submit_store([1], [0])
    async with await kv.events() as stream:
        await fut
        assert [(e.kind, e.keys) for e in drain(stream)] == [("stored", [1])]


@pytest.mark.parametrize("error", ["down", "corrupt"])
async def test_a_cancelled_partial_load_whose_read_then_fails_raises_the_cancellation(
    error: str,
) -> None:
    """A partial load cancelled while its read runs in a worker thread, the read
    then failing (the tier down with a ``retry_after``, or a checksum): the load
    does not go round again for what the other tiers hold; it raises the
    cancellation, and leaves no pin behind."""
    reading, release = threading.Event(), threading.Event()
    with anyio.fail_after(20):
        async with kvactors.open(small_config()) as kv:
            keys = list(range(12))
            fill(kv, keys, keys)
            await kv.store(keys[:8], keys[:8])
            await kv.store(keys[8:], keys[8:])  # demotes 0..3 to NVMe
            assert (await kv.lookup(keys[:4])).tiers == ["nvme"] * 4
            nvme: Any = kv.medium("nvme")
            read = nvme.read_buffers

            def failing(ids: list[int], bufs: Any, keys: list[Any]) -> list[int]:
                reading.set()
                release.wait(10)
                if error == "down":
                    down = TierFailed("server gone")
                    down.retry_after = 5.0
                    raise down
                read(ids, bufs, keys)
                return [0]  # the first block fails its checksum

            nvme.read_buffers = failing
            returned: list[object] = []
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:

                    async def load() -> None:
                        returned.append(await kv.load(keys[:4], [20, 21, 22, 23], partial=True))

                    tg.start_soon(load)
                    while not reading.is_set():
                        await anyio.sleep(0.005)
                    scope.cancel()
                    release.set()
            assert scope.cancelled_caught
            assert returned == []
            stats = await settled(kv)
            assert all(t.pinned == 0 for t in stats.policy.tiers.values())
