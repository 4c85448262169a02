"""Prefetch from lookups (no vLLM needed): the scheduler's Prefetcher posts moves
into a shared Mailbox, the worker's BlockMover reads NVMe blocks into the CPU
pool on its thread, and the blocks become CPU hits with the right bytes."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.test_vllm_mover import caches

from _redis import redis_server  # noqa: F401
from kvactors.errors import ConfigError
from kvactors.media.local_server import LocalServer
from kvactors.media.remote import RemoteStore
from kvactors.vllm.config import parse_settings
from kvactors.vllm.mover import BlockMover, GPUBlocks, PagedRows
from kvactors.vllm.prefetch import PROMOTE, Mailbox, MailboxReader, Prefetcher
from kvactors.vllm.tiers import CPU, NVME, TieredManager

KEYS = [bytes([i]) * 36 for i in range(8)]


def _setup(tmp: Path, cpu: int = 4, nvme: int = 16) -> tuple[TieredManager, Prefetcher, BlockMover]:
    tensors = caches(2, 32, 128)
    rows = PagedRows(tensors, [[0, 1]])
    path = tmp / "box.ctl"
    box = Mailbox(path, 1, -1)
    mover = BlockMover(
        rows,
        cpu,
        nvme,
        nvme_directory=str(tmp / "nvme"),
        nvme_backend="posix",
        mail=MailboxReader(Mailbox(path, 1, 0), 0),
    )
    tiers = TieredManager(cpu, nvme)
    return tiers, Prefetcher(tiers, box), mover


def _store(tiers: TieredManager, mover: BlockMover, keys: list[bytes], first: int) -> None:
    out = tiers.prepare_store(keys)
    assert out is not None
    mover.execute(True, GPUBlocks(list(range(first, first + len(keys))), [len(keys)], [0]), out[1])
    tiers.complete_store(out[0])


def _until(done: object, timeout: float = 20.0) -> None:
    """Poll ``done()`` (bounded: fails after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def _settle(prefetcher: Prefetcher) -> None:
    _until(lambda: prefetcher.poll() >= 0 and not prefetcher.in_flight)


def test_a_prefetched_block_becomes_a_cpu_hit_with_its_bytes(tmp_path: Path) -> None:
    tiers, prefetcher, mover = _setup(tmp_path)
    try:
        _store(tiers, mover, KEYS[0:4], 0)
        _store(tiers, mover, KEYS[4:8], 4)  # 0..3 demoted to NVMe
        assert tiers.source(KEYS[0]) == NVME
        originals = [t.clone() for t in mover.rows.tensors]
        assert not mover.rows.tensors[0][20].equal(originals[0][0])
        tiers.take_counters()
        assert prefetcher.start(KEYS[0])
        assert tiers.lookup(KEYS[0]) == "pending"  # vLLM asks again later
        assert not prefetcher.start(KEYS[0])  # one prefetch per key
        _settle(prefetcher)
        assert tiers.lookup(KEYS[0]) == "hit"
        assert tiers.source(KEYS[0]) == CPU
        # its CPU slot's victim went down to NVMe, and it is still readable there
        counters = tiers.take_counters()
        assert counters["prefetched_blocks"] == 1
        assert counters["demoted_blocks"] == 1
        plan = tiers.prepare_load([KEYS[0]])
        assert not plan.promote  # a CPU load now, no NVMe read in the job
        mover.execute(False, GPUBlocks([20], [1], [0]), plan)
        tiers.complete_load([KEYS[0]])
        for t, o in zip(mover.rows.tensors, originals):
            assert torch.equal(t[20], o[0])
        victim = next(k for k in KEYS[4:8] if tiers.source(k) == NVME)
        plan = tiers.prepare_load([victim])
        mover.execute(False, GPUBlocks([21], [1], [0]), plan)
        tiers.complete_load([victim])
        for t, o in zip(mover.rows.tensors, originals):
            assert torch.equal(t[21], o[KEYS.index(victim)])
    finally:
        mover.close()
        prefetcher.close()


def test_a_prefetch_failing_its_checksum_forgets_the_block(tmp_path: Path) -> None:
    tiers, prefetcher, mover = _setup(tmp_path)
    try:
        _store(tiers, mover, KEYS[0:4], 0)
        _store(tiers, mover, KEYS[4:8], 4)
        slot = tiers.nvme.get(KEYS[1]).block_id  # type: ignore[union-attr]
        path = next((tmp_path / "nvme").glob("blocks*.bin"))
        with path.open("r+b") as f:
            f.seek(slot * mover.rows.row_bytes)
            f.write(b"\xff" * 16)
        assert prefetcher.start(KEYS[1])
        _settle(prefetcher)
        assert tiers.lookup(KEYS[1]) == "miss"
        assert tiers.take_counters()["prefetch_failures"] == 1
    finally:
        mover.close()
        prefetcher.close()


def test_no_prefetch_without_a_free_cpu_slot_or_an_nvme_copy(tmp_path: Path) -> None:
    tiers, prefetcher, mover = _setup(tmp_path, cpu=2, nvme=8)
    try:
        _store(tiers, mover, KEYS[0:2], 0)
        assert not prefetcher.start(KEYS[0])  # in CPU already
        assert not prefetcher.start(KEYS[7])  # nowhere
        _store(tiers, mover, KEYS[2:4], 2)
        pin = tiers.prepare_load(KEYS[2:4])  # every CPU slot pinned
        assert not prefetcher.start(KEYS[0])
        assert tiers.lookup(KEYS[0]) == "hit"  # still loadable, read in the load job
        tiers.complete_load(KEYS[2:4])
        del pin
        assert prefetcher.start(KEYS[0])
        _settle(prefetcher)
        assert tiers.source(KEYS[0]) == CPU
    finally:
        mover.close()
        prefetcher.close()


def _worker(path: str, results: multiprocessing.Queue[list[int]], go: Any) -> None:
    box = Mailbox(path, 1, 0, capacity=2)
    reader = MailboxReader(box, 0)
    go.wait(20)  # the test fills the ring before this worker drains it
    deadline = time.monotonic() + 20
    seen: list[int] = []
    while len(seen) < 4 and time.monotonic() < deadline:
        moves = reader.take()
        reader.report(moves, [m.cpu_slot != 1 for m in moves])
        seen += [m.nvme_slot for m in moves]
        if any(m.key == -7 for m in moves):  # int keys travel too
            seen.append(-7)
        time.sleep(0.002)
    results.put(seen)


def test_the_mailbox_works_across_processes_and_is_unlinked(tmp_path: Path) -> None:
    path = tmp_path / "box.ctl"
    ctx = multiprocessing.get_context("fork")
    results: multiprocessing.Queue[list[int]] = ctx.Queue()
    go = ctx.Event()
    proc = ctx.Process(target=_worker, args=(str(path), results, go))
    proc.start()
    try:
        box = Mailbox(path, 1, -1, capacity=2)
        seqs = box.post([(PROMOTE, 0, 10, KEYS[0]), (PROMOTE, 1, 11, -7)])
        assert box.room() == 0
        with pytest.raises(ConfigError, match="room"):
            box.post([(PROMOTE, 2, 12, KEYS[2])])
        go.set()
        _until(lambda: box.completed() >= 2)
        assert [box.outcome(s) for s in seqs] == [True, False]
        (seq,) = box.post([(PROMOTE, 2, 12, KEYS[2])])  # the ring wrapped around
        assert seq == 2
        assert results.get(timeout=20) == [10, 11, -7, 12]
        assert not path.exists()  # both parties mapped it: the name is gone
        box.close()
    finally:
        proc.join(20)


def test_prefetch_setting() -> None:
    assert parse_settings({"cpu_bytes": 1}).prefetch is True
    assert parse_settings({"cpu_bytes": 1, "prefetch": False}).prefetch is False
    with pytest.raises(ConfigError, match=r"\['prefetch'\]"):
        parse_settings({"cpu_bytes": 1, "prefetch": "yes"})


def _remote_engine(
    tmp_path: Path, server: LocalServer, name: str
) -> tuple[TieredManager, Prefetcher, BlockMover]:
    """One engine's tiers (CPU, the remote), prefetcher and mover, on ``server``."""
    tensors = caches(2, 32, 128)
    rows = PagedRows(tensors, [[0, 1]])
    path = tmp_path / f"{name}.ctl"
    store = RemoteStore(name, rows.row_bytes, url=server.url, namespace="vllmtest")
    mover = BlockMover(rows, 4, mail=MailboxReader(Mailbox(path, 1, 0), 0), remote=store)
    tiers = TieredManager(4, remote=True)
    return tiers, Prefetcher(tiers, Mailbox(path, 1, -1), nvme=False), mover


def test_remote_tier_stores_and_a_fresh_engine_fetches(
    tmp_path: Path,
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """Engine A's store jobs also write to the server; engine B (fresh tiers, no
    NVMe) looks a block up, fetches it into CPU through the mailbox, loads its
    bytes. A block the server lacks stays a miss; a down server is a miss too."""

    a_tiers, a_pre, a = _remote_engine(tmp_path, redis_server, "a")
    b_tiers, b_pre, b = _remote_engine(tmp_path, redis_server, "b")
    try:
        out = a_tiers.prepare_store(KEYS[0:3])
        assert out is not None
        assert out[1].remote_put.keys == KEYS[0:3]
        a.execute(True, GPUBlocks([0, 1, 2], [3], [0]), out[1])
        a_tiers.complete_store(out[0])
        assert a.remote_refused == 0
        want = [t[1].clone() for t in a.rows.tensors]
        assert b_tiers.lookup(KEYS[1]) == "miss"  # B's own tiers are empty
        assert not b_pre.start(KEYS[1])  # an NVMe prefetch: B has no NVMe
        assert b_pre.start(KEYS[1], from_remote=True)
        assert b_pre.start(KEYS[7], from_remote=True)  # the server lacks it
        assert b_tiers.lookup(KEYS[1]) == "pending"
        _settle(b_pre)
        assert b_tiers.lookup(KEYS[1]) == "hit"
        assert b_tiers.lookup(KEYS[7]) == "miss"
        counters = b_tiers.take_counters()
        assert counters["remote_fetched_blocks"] == 1
        assert counters["remote_fetch_failures"] == 1
        plan = b_tiers.prepare_load([KEYS[1]])
        b.execute(False, GPUBlocks([9], [1], [0]), plan)
        b_tiers.complete_load([KEYS[1]])
        for t, w in zip(b.rows.tensors, want):
            assert torch.equal(t[9], w)
        # the server goes away: stores still succeed (counted), fetches miss
        redis_server.kill()
        out = a_tiers.prepare_store([KEYS[5]])
        assert out is not None
        a.execute(True, GPUBlocks([5], [1], [0]), out[1])
        assert a.remote_refused == 1
        assert b_pre.start(KEYS[2], from_remote=True)
        _settle(b_pre)
        assert b_tiers.lookup(KEYS[2]) == "miss"
    finally:
        for pre, mover in ((a_pre, a), (b_pre, b)):
            mover.close()
            pre.close()


def test_a_damaged_value_fetched_is_a_miss_and_deleted_from_the_server(
    tmp_path: Path,
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """The backend's fetch of a value overwritten with garbage in the server is a
    miss (the CPU slot is not served), and the value is deleted, so the next
    engine that asks finds it absent instead of damaged again; the good block
    fetched beside it is a hit."""
    a_tiers, a_pre, a = _remote_engine(tmp_path, redis_server, "a")
    b_tiers, b_pre, b = _remote_engine(tmp_path, redis_server, "b")
    try:
        out = a_tiers.prepare_store(KEYS[0:2])
        assert out is not None
        a.execute(True, GPUBlocks([0, 1], [2], [0]), out[1])
        a_tiers.complete_store(out[0])
        assert a.remote is not None
        assert b.remote is not None
        client = redis_server.client()
        good, damaged = (a.remote.redis_key(k) for k in KEYS[0:2])
        assert client.exists(good, damaged) == 2
        client.set(damaged, b"garbage")
        assert b_pre.start(KEYS[0], from_remote=True)
        assert b_pre.start(KEYS[1], from_remote=True)
        _settle(b_pre)
        assert b_tiers.lookup(KEYS[0]) == "hit"
        assert b_tiers.lookup(KEYS[1]) == "miss"
        counters = b_tiers.take_counters()
        assert counters["remote_fetched_blocks"] == 1
        assert counters["remote_fetch_failures"] == 1
        assert b.remote.counters().corrupt == 1
        assert client.exists(damaged) == 0
        assert client.exists(good) == 1
    finally:
        for pre, mover in ((a_pre, a), (b_pre, b)):
            mover.close()
            pre.close()


def test_remote_settings_name_their_key() -> None:
    s = parse_settings({"cpu_bytes": 1, "remote_url": "redis://127.0.0.1:6379/0"})
    assert s.remote
    assert s.remote_namespace == "kvactors"
    assert s.remote_ttl is None
    assert not parse_settings({"cpu_bytes": 1}).remote
    bad = {
        "remote_url": "127.0.0.1:6379",
        "remote_nodes": "127.0.0.1:7000",
        "remote_namespace": "a:b",
        "remote_model": "",
        "remote_timeout": 0,
        "remote_ttl": -1,
    }
    for key, value in bad.items():
        with pytest.raises(ConfigError, match=rf"\['{key}'\]"):
            parse_settings({"cpu_bytes": 1, key: value})
    with pytest.raises(ConfigError, match="not both"):
        parse_settings({"cpu_bytes": 1, "remote_url": "redis://h:1", "remote_nodes": ["h:2"]})
