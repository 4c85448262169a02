"""The NVMe tier keeps what it stored across restarts and never serves a bad block."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

import kvactors
from _served import drain
from kvactors.cli.demo import block_bytes_for
from kvactors.config import Config, GPUConfig, NVMeConfig, TierConfig
from kvactors.errors import CacheLockedError, ConfigError, IntegrityError
from kvactors.media import FileStore
from kvactors.media.nvme_index import NVMeIndex

pytestmark = pytest.mark.anyio

BB = 4096
CPU = torch.device("cpu")


STRIPES = NVMeConfig().stripes


def block_place(directory: Path, slot: int) -> tuple[Path, int]:
    """The file that holds ``slot`` of the default layout and the slot's offset in it."""
    return directory / f"blocks.{slot % STRIPES}.bin", slot // STRIPES * BB


def durable_config(directory: Path, **changes: Any) -> Config:
    base = Config(
        block_bytes=BB,
        gpu=GPUConfig(num_blocks=32, device="cpu"),
        cpu=TierConfig(num_blocks=4),
        nvme=NVMeConfig(num_blocks=64, directory=str(directory), backend="posix"),
        write_mode="write_through",
    )
    return base.replace(**changes) if changes else base


async def store_keys(kv: kvactors.KVCache, keys: list[int]) -> None:
    for i in range(0, len(keys), 4):
        chunk = keys[i : i + 4]
        await kv.store(chunk, block_bytes_for(chunk, BB, CPU))


async def load_all(kv: kvactors.KVCache, keys: list[int]) -> torch.Tensor:
    out = torch.empty(len(keys), BB, dtype=torch.uint8)
    await kv.load(keys, out)
    return out


async def test_reopen_serves_every_completed_block_byte_exact(tmp_path: Path) -> None:
    keys = list(range(1000, 1020))
    with anyio.fail_after(20):
        async with kvactors.open(durable_config(tmp_path)) as kv:
            await store_keys(kv, keys)
        async with kvactors.open(durable_config(tmp_path)) as kv:
            found = await kv.lookup(keys)
            assert found.hits == 20
            assert set(found.tiers) == {"nvme"}
            assert torch.equal(await load_all(kv, keys), block_bytes_for(keys, BB, CPU))
            stats = await kv.stats()
            assert stats.policy.tiers["nvme"].used == 20


async def test_reopen_with_another_block_size_is_a_config_error(tmp_path: Path) -> None:
    with anyio.fail_after(20):
        async with kvactors.open(durable_config(tmp_path)) as kv:
            await store_keys(kv, [1])
        with pytest.raises(ConfigError, match=r"nvme\.directory"):
            async with kvactors.open(durable_config(tmp_path, block_bytes=2 * BB)):
                pass


async def test_a_second_opener_gets_a_lock_error(tmp_path: Path) -> None:
    with anyio.fail_after(20):
        async with kvactors.open(durable_config(tmp_path)):
            with pytest.raises(CacheLockedError, match="in use"):
                FileStore("nvme", 64, BB, str(tmp_path), stripes=2)
        FileStore("nvme", 64, BB, str(tmp_path), stripes=2).close()  # released on close


def corrupt(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
async def test_damaged_block_files_are_misses_not_garbage(tmp_path: Path, damage: str) -> None:
    """The block in the file's last used slot is damaged (one flipped byte, or
    the file cut short in its middle): loading it is an IntegrityError, then a
    miss, with a ``corrupted`` event; the blocks before it still load."""
    keys = [1, 2, 3, 4]
    with anyio.fail_after(20):
        async with kvactors.open(durable_config(tmp_path)) as kv:
            await store_keys(kv, keys)
        index = NVMeIndex(tmp_path, BB, 64, STRIPES)
        slot_of = {e.key: e.slot for e in index.entries()}
        index.close()
        victim = max(keys, key=slot_of.__getitem__)
        good = keys[: keys.index(victim)]
        blocks, offset = block_place(tmp_path, slot_of[victim])
        if damage == "flip":
            corrupt(blocks, offset + 100)
        else:
            os.truncate(blocks, offset + 10)
        async with kvactors.open(durable_config(tmp_path)) as kv:
            events: Any = await kv.events()
            with events:
                with pytest.raises(IntegrityError) as info:
                    await load_all(kv, keys)
                assert info.value.keys == [victim]
                # Afterwards the block is a miss: lookups and partial loads stop before it.
                assert (await kv.lookup(keys)).hits == len(good)
                out = torch.empty(4, BB, dtype=torch.uint8)
                res = await kv.load(keys, out, partial=True)
                assert len(res.tiers) == len(good)
                assert torch.equal(out[: len(good)], block_bytes_for(good, BB, CPU))
                stats = await kv.stats()
                assert stats.policy.corrupted == 1
                seen = drain(events)
            assert any(e.kind == "corrupted" and e.keys == [victim] for e in seen)
        # The drop is durable too: a third open no longer lists the block.
        index = NVMeIndex(tmp_path, BB, 64, STRIPES)
        assert victim not in {e.key for e in index.entries()}
        index.close()


async def test_corrupt_partial_load_returns_the_good_prefix(tmp_path: Path) -> None:
    keys = [1, 2, 3, 4]
    with anyio.fail_after(20):
        async with kvactors.open(durable_config(tmp_path)) as kv:
            await store_keys(kv, keys)
        index = NVMeIndex(tmp_path, BB, 64, STRIPES)
        corrupt(*block_place(tmp_path, index.by_key[2].slot))
        index.close()
        async with kvactors.open(durable_config(tmp_path)) as kv:
            out = torch.empty(4, BB, dtype=torch.uint8)
            res = await kv.load(keys, out, partial=True)
            assert res.tiers == ["nvme"]
            assert torch.equal(out[0], block_bytes_for([1], BB, CPU)[0])


def failing(err: int, calls: list[int]) -> Callable[..., int]:
    def fail(*args: Any) -> int:
        calls.append(1)
        raise OSError(err, os.strerror(err))

    return fail


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
async def test_write_errors_keep_the_cpu_copy_and_free_nvme_slots(tmp_path: Path, err: int) -> None:
    with anyio.fail_after(20):
        async with kvactors.open(durable_config(tmp_path)) as kv:
            store: FileStore = kv.medium("nvme")  # type: ignore[assignment]
            calls: list[int] = []
            store.pwritev = failing(err, calls)
            data = block_bytes_for([7, 8], BB, CPU)
            assert await kv.store([7, 8], data) == kvactors.StoreResult(2, 0)
            assert calls  # the NVMe write was attempted and failed
            stats = await kv.stats()
            assert stats.policy.tiers["nvme"].used == 0  # slots freed
            assert stats.policy.tiers["nvme"].being_written == 0
            assert stats.tiers["nvme"].failed_jobs == 1
            assert (await kv.lookup([7, 8])).tiers == ["cpu", "cpu"]
            assert torch.equal(await load_all(kv, [7, 8]), data)
            store.pwritev = os.pwritev  # space is back
            await kv.store([9], block_bytes_for([9], BB, CPU))
            assert (await kv.stats()).policy.tiers["nvme"].used == 1


async def test_read_errors_are_misses(tmp_path: Path) -> None:
    with anyio.fail_after(20):
        async with kvactors.open(durable_config(tmp_path)) as kv:
            await store_keys(kv, [1, 2])
        async with kvactors.open(durable_config(tmp_path)) as kv:
            store: FileStore = kv.medium("nvme")  # type: ignore[assignment]
            store.preadv = failing(errno.EIO, [])
            with pytest.raises(IntegrityError):
                await load_all(kv, [1, 2])
            assert (await kv.lookup([1, 2])).hits == 0


def test_torn_log_tail_is_cut_off(tmp_path: Path) -> None:
    index = NVMeIndex(tmp_path, BB, 16)
    index.put([(1, 0, 11), (b"k", 1, 22)])
    index.close()
    with open(tmp_path / "index.1.log", "ab") as fh:
        fh.write(b"\x20\x00\x00\x00garbage")  # a frame cut short by a crash
    index = NVMeIndex(tmp_path, BB, 16)
    assert index.torn_tail
    assert [(e.key, e.slot, e.crc) for e in index.entries()] == [(1, 0, 11), (b"k", 1, 22)]
    index.put([(2, 2, 33)])
    index.close()
    again = NVMeIndex(tmp_path, BB, 16)
    assert not again.torn_tail
    assert [e.key for e in again.entries()] == [1, b"k", 2]
    again.close()


def test_compaction_keeps_live_entries_and_slot_reuse(tmp_path: Path) -> None:
    index = NVMeIndex(tmp_path, BB, 8)
    for i in range(3000):  # many rewrites of 8 slots force compactions
        index.put([(i, i % 8, i)], sync=False)
    index.delete([2999])
    index.close()
    again = NVMeIndex(tmp_path, BB, 8)
    assert sorted((e.slot, e.key) for e in again.entries()) == [
        (s, 2992 + s) for s in range(8) if 2992 + s != 2999
    ]
    assert again.log_records <= 1100
    assert again.compactions == 0  # the reopen replayed only the log tail
    again.close()


WRITER = textwrap.dedent(
    """
    import sys, anyio, torch, kvactors
    from kvactors.cli.demo import block_bytes_for
    from kvactors.config import Config, GPUConfig, NVMeConfig, TierConfig

    async def main(directory):
        config = Config(
            block_bytes=4096,
            gpu=GPUConfig(num_blocks=8, device="cpu"),
            cpu=TierConfig(num_blocks=8),
            nvme=NVMeConfig(num_blocks=4096, directory=directory, backend="posix"),
            write_mode="write_through",
        )
        async with kvactors.open(config) as kv:
            for key in range(10**6):
                await kv.store([key], block_bytes_for([key], 4096, torch.device("cpu")))
                print(key, flush=True)

    anyio.run(main, sys.argv[1])
    """
)


async def test_sigkill_mid_stream_loses_nothing_reported_stored(tmp_path: Path) -> None:
    """A writer is killed with SIGKILL in the middle of a stream of write-through
    stores. Every block whose store had returned is served byte-exact after
    reopening, and nothing torn is ever served."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    directory = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(directory)], stdout=subprocess.PIPE, text=True
    )
    reported: list[int] = []
    assert proc.stdout is not None
    with anyio.fail_after(60):
        while len(reported) < 300:
            line = await anyio.to_thread.run_sync(proc.stdout.readline)
            assert line, "the writer died early"
            reported.append(int(line))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    with anyio.fail_after(30):
        async with kvactors.open(
            durable_config(
                directory,
                nvme={"num_blocks": 4096, "directory": str(directory), "backend": "posix"},
                gpu={"num_blocks": 8, "device": "cpu"},
                cpu={"num_blocks": 8},
            )
        ) as kv:
            assert (await kv.lookup(reported)).hits == len(reported)
            for i in range(0, len(reported), 50):
                chunk = reported[i : i + 50]
                assert torch.equal(await load_all(kv, chunk), block_bytes_for(chunk, BB, CPU))
            # Whatever else survived is either exact or refused, never wrong.
            extra = list(range(reported[-1] + 1, reported[-1] + 4))
            out = torch.empty(len(extra), BB, dtype=torch.uint8)
            try:
                res = await kv.load(extra, out, partial=True)
            except IntegrityError:
                res = kvactors.LoadResult([])
            n = len(res.tiers)
            assert torch.equal(out[:n], block_bytes_for(extra[:n], BB, CPU))


def test_the_nvme_tier_manager_is_restored_from_the_index_itself(tmp_path: Path) -> None:
    """Opening the cache gives the NVMe tier's manager the store's index (not a
    list of pairs): it restores every entry, oldest first, and on the compiled
    core shares the index's table (a second manager cannot attach to it)."""
    from kvactors.cache.handle import _recovered
    from kvactors.cache.policy_actor import PolicyActor
    from kvactors.manager import NATIVE, OffloadingManager

    config = durable_config(tmp_path)
    store = FileStore("nvme", 64, BB, str(tmp_path))
    try:
        rows = block_bytes_for([7, 8, 99], BB, CPU)
        store.write_from([9, 2, 40], rows, [7, 8, b"k"])
        found = _recovered(store)
        assert found is store.index
        actor = PolicyActor(config, [("cpu", False), ("nvme", True)], [[], found])
        nvme = actor.managers[1]
        assert len(nvme) == 3
        assert [getattr(nvme.get(k), "block_id", None) for k in (7, 8, b"k")] == [9, 2, 40]
        assert nvme.lookup([7, 8, b"k", 5]) == 3
        if NATIVE:
            with pytest.raises(RuntimeError, match="another manager"):
                OffloadingManager(64, block_size=BB).restore_index(store.index)
    finally:
        store.close()


class FailFrom:
    """Faults: every block write from the ``first``-th call on fails with ``err``."""

    def __init__(self, err: int, first: int) -> None:
        self.err, self.first, self.writes = err, first, 0

    def on_io(self, write: bool, stripe: int, offset: int, nbytes: int) -> int:
        if not write:
            return 0
        self.writes += 1
        return -self.err if self.writes >= self.first else 0

    def on_read(self, buffers: list[memoryview]) -> None:
        pass


@pytest.mark.parametrize("err", [errno.EFBIG, errno.ENOSPC])
async def test_a_write_cut_off_by_efbig_or_enospc_leaves_nothing_half_written(
    tmp_path: Path, err: int
) -> None:
    # docs/durability.md "Writes that fail": injected on the path users run
    # (FileStore.faults, the compiled loop included), the second run of a
    # store's write fails after the first landed: the store lands in CPU only,
    # nothing of it is indexed, and after a reopen only what was durable is there.
    with anyio.fail_after(30):
        cfg = durable_config(tmp_path, cpu=TierConfig(num_blocks=16))
        kept, lost = list(range(8)), list(range(100, 108))
        async with kvactors.open(cfg) as kv:
            assert (await kv.store(kept, block_bytes_for(kept, BB, CPU))).durable == kept
            store: FileStore = kv.medium("nvme")  # type: ignore[assignment]
            store.faults = faults = FailFrom(err, 2)
            result = await kv.store(lost, block_bytes_for(lost, BB, CPU))
            store.faults = None
            assert result == kvactors.StoreResult(8, 0)
            assert faults.writes >= 2  # a run was written before one failed
            stats = await kv.stats()
            assert stats.tiers["nvme"].failed_jobs == 1
            assert stats.policy.tiers["nvme"].used == len(kept)
        async with kvactors.open(cfg) as kv:
            for key in lost:
                assert (await kv.lookup([key])).hits == 0
            assert (await kv.lookup(kept)).tiers == ["nvme"] * len(kept)
            assert torch.equal(await load_all(kv, kept), block_bytes_for(kept, BB, CPU))
