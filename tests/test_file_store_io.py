"""How the NVMe store turns a request into system calls: slots sorted, runs of
adjacent slots merged into one vectored call, reads spread over I/O threads, and
what a failure in one run does to the others."""

from __future__ import annotations

import errno
import os
import random
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvactors.errors import ConfigError, TransferError
from kvactors.media import FileStore, MemoryPool, file_store
from kvactors.media.file_plan import batches
from kvactors.media.kvikio_io import _KvikioIO

BB = 4096


def pool(n: int, seed: int) -> MemoryPool:
    cpu = MemoryPool("cpu", n, BB, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    cpu.data.copy_(torch.randint(0, 256, (n, BB), dtype=torch.uint8, generator=g))
    return cpu


def test_batches_sort_slots_and_merge_adjacent_ones() -> None:
    ids = [7, 3, 5, 0, 4, 6, 10, 9]
    assert batches(ids) == [(0, [3]), (3, [1, 4, 2, 5, 0]), (9, [7, 6])]
    assert batches([]) == []
    # A slot named twice stays in request order (the later buffer is written last).
    assert batches([2, 2, 3]) == [(2, [0]), (2, [1, 2])]


def test_batches_over_stripes_merge_slots_adjacent_in_their_file() -> None:
    """Slot s lives in file s % 2 at block s // 2: 3, 5, 7 are one run of file 1."""
    ids = [7, 3, 5, 0, 4, 6, 10, 9]
    assert batches(ids, 2) == [(0, [3]), (4, [4, 5]), (10, [6]), (3, [1, 2, 0, 7])]


@pytest.fixture(params=["native", "python"])
def io_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on the compiled I/O loop and on one system call per batch from Python."""
    if request.param == "python":
        monkeypatch.setattr(file_store, "_io_vectored", None)
    elif file_store._io_vectored is None:
        pytest.skip("compiled I/O core not built")
    return str(request.param)


@pytest.mark.parametrize(
    ("io_threads", "stripes"), [(1, 1), (2, 1), (3, 1), (2, 2), (3, 3), (1, 2)]
)
@pytest.mark.usefixtures("io_path")
def test_shuffled_slots_round_trip(tmp_path: Path, io_threads: int, stripes: int) -> None:
    """Many shuffled slots (enough runs to use the I/O threads) come back byte-exact,
    over one file or several, on either I/O path."""
    n = 600
    rng = random.Random(io_threads * 10 + stripes)
    src = pool(n, 1)
    src_ids = rng.sample(range(n), 300)
    slots = rng.sample(range(2 * n), 300)
    keys: list[bytes | int] = [1000 + s for s in slots]
    store = FileStore("nvme", 2 * n, BB, str(tmp_path), io_threads=io_threads, stripes=stripes)
    try:
        assert len(store.paths) == stripes
        store.write_buffers(slots, src.buffers(src_ids), keys)
        dst = MemoryPool("cpu", n, BB, torch.device("cpu"))
        dst_ids = rng.sample(range(n), 300)
        assert store.read_buffers(slots, dst.buffers(dst_ids), keys) == []
        assert torch.equal(dst.data[dst_ids], src.data[src_ids])
        # Reading without keys is the same bytes, unchecked.
        again = MemoryPool("cpu", n, BB, torch.device("cpu"))
        assert store.read_buffers(slots, again.buffers(dst_ids)) == []
        assert torch.equal(again.data[dst_ids], src.data[src_ids])
    finally:
        store.close()


def test_adjacent_slots_are_one_call_in_file_order(tmp_path: Path) -> None:
    src = pool(8, 2)
    store = FileStore("nvme", 16, BB, str(tmp_path), io_threads=1)
    calls: list[tuple[int, int]] = []

    def spy(real: Any) -> Any:
        def call(fd: int, bufs: list[memoryview], offset: int) -> int:
            calls.append((offset // BB, len(bufs)))
            return int(real(fd, bufs, offset))

        return call

    try:
        store.pwritev = spy(os.pwritev)
        store.preadv = spy(os.preadv)
        ids = [12, 4, 6, 5, 0, 13]
        store.write_buffers(ids, src.buffers(list(range(6))))
        assert calls == [(0, 1), (4, 3), (12, 2)]
        calls.clear()
        dst = MemoryPool("cpu", 8, BB, torch.device("cpu"))
        store.read_buffers(ids, dst.buffers(list(range(6))))
        assert calls == [(0, 1), (4, 3), (12, 2)]
        assert torch.equal(dst.data[:6], src.data[:6])
    finally:
        store.close()


@pytest.mark.usefixtures("io_path")
def test_runs_longer_than_iov_max_are_split(tmp_path: Path) -> None:
    n = 1100  # more buffers than one preadv/pwritev takes (IOV_MAX = 1024)
    src = MemoryPool("cpu", n, 512, torch.device("cpu"))
    src.data.copy_(torch.randint(0, 256, (n, 512), dtype=torch.uint8))
    store = FileStore("nvme", n, 512, str(tmp_path))
    try:
        ids = list(range(n))
        store.write_buffers(ids, src.buffers(ids))
        dst = MemoryPool("cpu", n, 512, torch.device("cpu"))
        store.read_buffers(ids, dst.buffers(ids))
        assert torch.equal(dst.data, src.data)
    finally:
        store.close()


def failing_at(real: Any, bad_slot: int, result: int | None) -> Any:
    """An I/O call that fails (``result=None``) or returns ``result`` bytes for the
    run starting at ``bad_slot``, and records every offset it was called with."""

    def call(fd: int, bufs: list[memoryview], offset: int) -> int:
        with lock:
            seen.append(offset // BB)
        if offset // BB == bad_slot:
            if result is None:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real(fd, bufs, offset)
            return result
        return int(real(fd, bufs, offset))

    lock = threading.Lock()
    seen: list[int] = []
    call.seen = seen  # type: ignore[attr-defined]
    return call


@pytest.mark.parametrize("io_threads", [1, 2])
def test_a_failed_read_run_is_reported_after_all_runs_finished(
    tmp_path: Path, io_threads: int
) -> None:
    """A run that fails stops its thread's stretch of the file; the other stretches
    finish before the error reaches the caller, so no I/O thread is still writing
    into the caller's buffers afterwards."""
    n = 64
    src = pool(n, 3)
    slots = [2 * i for i in range(n)]  # no two adjacent: 64 runs, threads used
    keys: list[bytes | int] = list(range(n))
    store = FileStore("nvme", 2 * n, BB, str(tmp_path), io_threads=io_threads)
    try:
        store.write_buffers(slots, src.buffers(list(range(n))), keys)
        store.preadv = failing_at(os.preadv, bad_slot=10, result=None)
        dst = MemoryPool("cpu", n, BB, torch.device("cpu"))
        with pytest.raises(TransferError, match=r"reading slots 10\.\.10 failed"):
            store.read_buffers(slots, dst.buffers(list(range(n))))
        seen = sorted(store.preadv.seen)  # type: ignore[attr-defined]
        if io_threads == 1:
            assert seen == slots[:6]  # in file order, up to the failed run
        else:
            assert seen == slots[:6] + slots[32:]  # the second stretch ran to its end
        # With keys the failed block is a miss and every other block is served.
        assert store.read_buffers(slots, dst.buffers(list(range(n))), keys) == [5]
        good = [i for i in range(n) if i != 5]
        assert torch.equal(dst.data[good], src.data[good])
    finally:
        store.close()


def test_a_short_read_tears_only_the_end_of_its_run(tmp_path: Path) -> None:
    src = pool(6, 4)
    ids = [9, 3, 4, 5, 6, 0]  # runs: [0], [3, 4, 5, 6], [9]
    keys: list[bytes | int] = [10, 11, 12, 13, 14, 15]
    store = FileStore("nvme", 12, BB, str(tmp_path))
    try:
        store.write_buffers(ids, src.buffers(list(range(6))), keys)
        # The run at slot 3 stops after one block and a half: slots 4..6 are torn.
        store.preadv = failing_at(os.preadv, bad_slot=3, result=BB + BB // 2)
        dst = MemoryPool("cpu", 6, BB, torch.device("cpu"))
        assert store.read_buffers(ids, dst.buffers(list(range(6))), keys) == [2, 3, 4]
        assert store.corrupted == 3
        with pytest.raises(TransferError, match=r"short read of slots 3\.\.6"):
            store.read_buffers(ids, dst.buffers(list(range(6))))
    finally:
        store.close()


def test_a_failed_write_run_stops_the_write_and_indexes_nothing(tmp_path: Path) -> None:
    src = pool(4, 5)
    store = FileStore("nvme", 16, BB, str(tmp_path))
    try:
        store.pwritev = failing_at(os.pwritev, bad_slot=8, result=None)
        with pytest.raises(OSError, match="Input/output error"):
            store.write_buffers([12, 8, 2, 3], src.buffers([0, 1, 2, 3]), [1, 2, 3, 4])
        # Slot order: the run at 2 was written, the one at 8 failed, 12 never started.
        assert store.pwritev.seen == [2, 8]  # type: ignore[attr-defined]
        assert store.recovered() == []
        store.pwritev = failing_at(os.pwritev, bad_slot=8, result=100)
        with pytest.raises(TransferError, match=r"short write of slots 8\.\.8: 100 of 4096"):
            store.write_buffers([12, 8], src.buffers([0, 1]), [1, 2])
        assert store.recovered() == []
    finally:
        store.close()


class _FakeFuture:
    def __init__(self, n: int) -> None:
        self.n = n

    def get(self) -> int:
        return self.n


class _FakeCuFile:
    """kvikio.CuFile's pread/pwrite over a bytearray, short after ``limit`` bytes."""

    def __init__(self, size: int, limit: int) -> None:
        self.data = bytearray(size)
        self.limit = limit

    def pread(self, buf: memoryview, size: int, offset: int) -> _FakeFuture:
        n = max(0, min(size, self.limit - offset))
        buf[:n] = self.data[offset : offset + n]
        return _FakeFuture(n)

    def pwrite(self, buf: memoryview, size: int, offset: int) -> _FakeFuture:
        n = max(0, min(size, self.limit - offset))
        self.data[offset : offset + n] = buf[:n]
        return _FakeFuture(n)


def test_kvikio_adapter_handles_runs_of_several_buffers() -> None:
    """The kvikio adapter issues one request per buffer of a run (no CUDA needed)."""
    io = _KvikioIO.__new__(_KvikioIO)
    # Two stripes: each descriptor reaches its own file.
    io.files = {7: _FakeCuFile(8 * BB, limit=6 * BB), 8: _FakeCuFile(8 * BB, limit=8 * BB)}
    src = pool(4, 6)
    assert io.pwritev(7, src.buffers([0, 1, 2]), 2 * BB) == 3 * BB
    dst = MemoryPool("cpu", 4, BB, torch.device("cpu"))
    assert io.preadv(7, dst.buffers([0, 1, 2]), 2 * BB) == 3 * BB
    assert torch.equal(dst.data[:3], src.data[:3])
    assert io.files[8].data == bytearray(8 * BB)  # the other stripe untouched
    # Past the file's end: the byte count stops at the first short request.
    assert io.preadv(7, dst.buffers([0, 1, 2]), 4 * BB) == 2 * BB


def test_a_directory_reopens_only_with_its_stripes(tmp_path: Path) -> None:
    """Slots are placed by the stripe count, so a directory made with 2 files is
    refused (naming the field) with 3, and reopens byte-exact with 2."""
    src = pool(4, 2)
    store = FileStore("nvme", 9, BB, str(tmp_path), stripes=2)
    store.write_buffers([8, 1, 4, 7], src.buffers([0, 1, 2, 3]), [80, 10, 40, 70])
    store.close()
    assert sorted(p.name for p in tmp_path.glob("blocks*")) == ["blocks.0.bin", "blocks.1.bin"]
    assert (tmp_path / "blocks.0.bin").stat().st_size == 5 * BB  # slots 0, 2, 4, 6, 8
    assert (tmp_path / "blocks.1.bin").stat().st_size == 4 * BB
    with pytest.raises(ConfigError, match=r"nvme\.stripes = 3"):
        FileStore("nvme", 9, BB, str(tmp_path), stripes=3)
    store = FileStore("nvme", 9, BB, str(tmp_path), stripes=2)
    try:
        assert sorted(e.key for e in store.recovered()) == [10, 40, 70, 80]
        dst = MemoryPool("cpu", 4, BB, torch.device("cpu"))
        assert store.read_buffers([8, 1, 4, 7], dst.buffers([0, 1, 2, 3]), [80, 10, 40, 70]) == []
        assert torch.equal(dst.data, src.data)
    finally:
        store.close()


@pytest.mark.usefixtures("io_path")
def test_a_truncated_file_is_a_short_read_on_either_path(tmp_path: Path) -> None:
    """Blocks past the end of a cut stripe file: torn with keys (a miss), a
    TransferError naming the slots without."""
    src = pool(8, 4)
    ids = list(range(8))
    keys: list[bytes | int] = [100 + i for i in ids]
    store = FileStore("nvme", 8, BB, str(tmp_path), stripes=2)
    try:
        store.write_buffers(ids, src.buffers(ids), keys)
        os.truncate(store.paths[1], BB + BB // 2)  # stripe 1 keeps slot 1, half of slot 3
        dst = MemoryPool("cpu", 8, BB, torch.device("cpu"))
        assert store.read_buffers(ids, dst.buffers(ids), keys) == [3, 5, 7]
        assert torch.equal(dst.data[[0, 1, 2, 4, 6]], src.data[[0, 1, 2, 4, 6]])
        with pytest.raises(TransferError, match=r"short read of slots 1\.\.7 \(every 2\)"):
            store.read_buffers(ids, dst.buffers(ids))
    finally:
        store.close()


@pytest.mark.skipif(file_store._io_vectored is None, reason="compiled I/O core not built")
def test_io_core_reports_bytes_or_errno_per_batch(tmp_path: Path) -> None:
    vectored = file_store._io_vectored
    assert vectored is not None
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        src = pool(3, 5)
        # Two batches: blocks 0-1 at offset 0, block 2 at offset 4 * BB.
        assert vectored(True, [fd, fd], [0, 4 * BB], [2, 1], src.buffers([0, 1, 2])) == [
            2 * BB,
            BB,
        ]
        dst = MemoryPool("cpu", 4, BB, torch.device("cpu"))
        # A batch past the end reads short; a bad descriptor is -errno; the rest still run.
        bufs = dst.buffers([0, 1, 2, 3])
        got = vectored(False, [fd, 10**6, fd], [4 * BB, 0, 0], [2, 1, 1], bufs)
        assert got == [BB, -errno.EBADF, BB]
        assert torch.equal(dst.data[[0, 3]], src.data[[2, 0]])
        with pytest.raises(ValueError, match="add up"):
            vectored(False, [fd], [0], [2], dst.buffers([0]))
        with pytest.raises(BufferError, match="not writable"):
            vectored(False, [fd], [0], [1], [bytes(BB)])  # a read needs a writable buffer
    finally:
        os.close(fd)


@pytest.mark.skipif(file_store._io_vectored is None, reason="compiled I/O core not built")
@pytest.mark.parametrize("depth", [2, 8])
def test_io_core_in_flight_batches_give_the_answers_of_one_at_a_time(
    tmp_path: Path, depth: int
) -> None:
    """``depth`` batches in flight at once: every batch's result and bytes are
    what one batch at a time gives, injected faults and errors included."""
    vectored = file_store._io_vectored
    assert vectored is not None
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        n = 24
        src = pool(n, 9)
        offsets = [i * 2 * BB for i in range(n)]  # one block per batch, holes between
        fds = [fd] * n
        plan = [0] * n
        plan[3], plan[7], plan[11] = -errno.EIO, BB // 2, -errno.ENOSPC
        wrote = vectored(True, fds, offsets, [1] * n, src.buffers(list(range(n))), plan, 0, depth)
        assert wrote == [
            -errno.EIO if i == 3 else -errno.ENOSPC if i == 11 else BB // 2 if i == 7 else BB
            for i in range(n)
        ]
        fds[5] = 10**6  # a bad descriptor fails only its batch
        results = []
        for d in (1, depth):
            dst = MemoryPool("cpu", n, BB, torch.device("cpu"))
            got = vectored(False, fds, offsets, [1] * n, dst.buffers(list(range(n))), None, 0, d)
            results.append((got, dst.data.clone()))
        assert results[0][0] == results[1][0]
        assert results[1][0][5] == -errno.EBADF
        assert torch.equal(results[0][1], results[1][1])
        ok = [i for i in range(n) if i not in (3, 5, 7, 11)]
        assert torch.equal(results[1][1][ok], src.data[ok])
        with pytest.raises(ValueError, match="depth"):
            vectored(False, [fd], [0], [1], dst.buffers([0]), None, 0, 0)
    finally:
        os.close(fd)


class Scripted:
    """Faults by slot: a planned result for the call starting at a slot, a byte
    flipped in reads of another; records the calls it was asked about."""

    def __init__(self, plan: dict[int, int], corrupt: int | None = None) -> None:
        self.plan = plan
        self.corrupt = corrupt
        self.asked: list[tuple[bool, int, int]] = []
        self.reads: list[int] = []

    def on_io(self, write: bool, stripe: int, offset: int, nbytes: int) -> int:
        slot = offset // BB  # one stripe in these tests
        self.asked.append((write, slot, nbytes // BB))
        return self.plan.get(slot, 0)

    def on_read(self, buffers: list[memoryview]) -> None:
        self.reads.append(len(buffers))
        if self.corrupt is not None and len(buffers) > self.corrupt:
            buffers[self.corrupt][0] ^= 0xFF


@pytest.mark.parametrize("io", ["buffered", "direct"])
@pytest.mark.usefixtures("io_path")
def test_injected_faults_reach_the_path_users_run(tmp_path: Path, io: str) -> None:
    """The fault hook is asked about every planned call, on the compiled loop as on
    the Python one; an injected errno fails the run without I/O, a short result
    tears the end of it, a flipped byte fails the checksum."""
    src = pool(6, 7)
    ids = [9, 3, 4, 5, 6, 0]  # runs: [0], [3..6], [9]
    keys: list[bytes | int] = [10, 11, 12, 13, 14, 15]
    if io == "direct" and file_store._io_vectored is None:
        pytest.skip("direct I/O runs on the compiled I/O core")
    store = FileStore("nvme", 12, BB, str(tmp_path), io_threads=1, io=io)
    try:
        store.faults = Scripted({3: -errno.ENOSPC})
        with pytest.raises(OSError, match="No space left"):
            store.write_buffers(ids, src.buffers(list(range(6))), keys)
        assert store.faults.asked == [(True, 0, 1), (True, 3, 4), (True, 9, 1)]  # every call
        assert store.recovered() == []  # the write stopped at the failed run: none indexed
        store.faults = None
        store.write_buffers(ids, src.buffers(list(range(6))), keys)
        dst = MemoryPool("cpu", 6, BB, torch.device("cpu"))
        faults = Scripted({3: BB + 10 if io == "buffered" else BB}, corrupt=0)
        store.faults = faults
        # Slot 3's run stops after one block (and 10 bytes, buffered): 4, 5, 6 torn; the byte
        # flipped in the first buffer of every read fails 9, 0 and 3.
        assert store.read_buffers(ids, dst.buffers(list(range(6))), keys) == [0, 1, 2, 3, 4, 5]
        assert faults.asked == [(False, 0, 1), (False, 3, 4), (False, 9, 1)]
        assert faults.reads == [1, 4, 1]
        store.faults = Scripted({9: -errno.EIO})
        assert store.read_buffers(ids, dst.buffers(list(range(6))), keys) == [0]
        assert torch.equal(dst.data[1:], src.data[1:])
    finally:
        store.close()


def test_injected_faults_count_what_they_did(tmp_path: Path) -> None:
    from kvactors.media.faults import InjectedFaults

    src = pool(64, 8)
    store = FileStore("nvme", 128, BB, str(tmp_path), io_threads=2)
    try:
        faults = InjectedFaults(3, p_write=0.5)
        store.faults = faults
        failed = 0
        for i in range(32):
            try:
                store.write_buffers([2 * i], src.buffers([i]), [i])
            except OSError:
                failed += 1
        assert failed == faults.writes_failed > 0
        assert len(store.recovered()) == 32 - failed
        store.faults = InjectedFaults(4, p_corrupt=1.0)
        slots = [e.slot for e in store.recovered()]
        keys: list[bytes | int] = [e.key for e in store.recovered()]
        dst = MemoryPool("cpu", 64, BB, torch.device("cpu"))
        bad = store.read_buffers(slots, dst.buffers(list(range(len(slots)))), keys)
        assert len(bad) == len(slots) == store.faults.reads_corrupted
    finally:
        store.close()


def test_io_mode_follows_the_config(tmp_path: Path) -> None:
    """auto: direct for a named directory with page-multiple blocks, buffered for a
    temporary one or odd sizes; direct asked for where it cannot run is refused."""
    if file_store._io_vectored is None:
        pytest.skip("compiled I/O core not built")
    cases = [
        (dict(directory=str(tmp_path / "a")), BB, "direct"),
        (dict(directory=None), BB, "buffered"),
        (dict(directory=str(tmp_path / "b")), 512, "buffered"),
        (dict(directory=str(tmp_path / "c"), io="buffered"), BB, "buffered"),
        (dict(directory=str(tmp_path / "d"), io="direct"), BB, "direct"),
    ]
    for kwargs, bb, want in cases:
        store = FileStore("nvme", 8, bb, **kwargs)  # type: ignore[arg-type]
        try:
            assert store.io == want
            assert len(store.direct_fds) == (store.stripes if want == "direct" else 0)
        finally:
            store.close()
    with pytest.raises(ConfigError, match=r"nvme\.io = 'direct' needs block_bytes"):
        FileStore("nvme", 8, 512, str(tmp_path / "e"), io="direct")
    with pytest.raises(ConfigError, match=r"nvme\.io must be"):
        FileStore("nvme", 8, BB, str(tmp_path / "f"), io="fast")


@pytest.mark.parametrize("offset", [0, 64, 1])
def test_direct_io_round_trips_aligned_and_unaligned_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offset: int
) -> None:
    """O_DIRECT takes page-aligned buffers as they are and any others through an
    aligned bounce buffer: the same bytes either way, runs longer than the
    bounce buffer included."""
    if file_store._io_vectored is None:
        pytest.skip("compiled I/O core not built")
    monkeypatch.setattr(file_store, "DIRECT_REQUEST_BYTES", 2**40)  # runs stay one request
    n = 1100  # one run of 4.3 MiB: more than the 4 MiB bounce buffer
    raw = torch.randint(0, 256, (n * BB + 2 * BB,), dtype=torch.uint8)
    skip = (-raw.data_ptr() % 4096 + offset) % (2 * BB)
    src = raw[skip : skip + n * BB].view(n, BB)
    store = FileStore("nvme", 2 * n, BB, str(tmp_path), io="direct", io_threads=2)
    try:
        ids = list(range(n))
        keys: list[bytes | int] = [10 + i for i in ids]
        store.write_from(ids, src, keys)
        out_raw = torch.empty(n * BB + 2 * BB, dtype=torch.uint8)
        skip = (-out_raw.data_ptr() % 4096 + offset) % (2 * BB)
        out = out_raw[skip : skip + n * BB].view(n, BB)
        assert store.read_into(ids, out, keys) == []
        assert torch.equal(out, src)
        shuffled = random.Random(offset).sample(range(n, 2 * n), 300)
        store.write_from(shuffled, src[:300], [1000 + s for s in shuffled])
        back = torch.empty(300, BB, dtype=torch.uint8)
        assert store.read_into(shuffled, back, [1000 + s for s in shuffled]) == []
        assert torch.equal(back, src[:300])
    finally:
        store.close()


def test_memory_pools_on_the_host_are_page_aligned() -> None:
    for n in (1, 3, 100):
        cpu = MemoryPool("cpu", n, BB, torch.device("cpu"))
        assert cpu.data.data_ptr() % 4096 == 0
        assert cpu.data.shape == (n, BB)
        assert not cpu.data.any()


@pytest.mark.parametrize(("most", "cut"), [(BB // 2, 1), (3 * BB + BB // 2, 3), (4 * BB, 4)])
def test_direct_runs_are_cut_into_requests_of_at_most_direct_request_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, most: int, cut: int
) -> None:
    """Direct, a run of adjacent slots longer than DIRECT_REQUEST_BYTES is several
    requests, in file order, each at most that long (whole blocks, at least one);
    the bytes round trip, and a short request tears only its own tail."""
    if file_store._io_vectored is None:
        pytest.skip("compiled I/O core not built")
    monkeypatch.setattr(file_store, "DIRECT_REQUEST_BYTES", most)
    src = pool(12, 9)
    ids = [11, 2, 3, 4, 5, 6, 7, 8, 9, 0]  # runs: [0], [2..9], [11]
    keys: list[bytes | int] = [100 + i for i in ids]
    store = FileStore("nvme", 16, BB, str(tmp_path), io_threads=2, io="direct")
    try:
        faults = Scripted({})
        store.faults = faults
        store.write_buffers(ids, src.buffers(list(range(10))), keys)
        starts = [0, *range(2, 10, cut), 11]
        want = [(True, s, min(cut, 10 - s) if 2 <= s < 10 else 1) for s in starts]
        assert sorted(faults.asked) == want
        dst = MemoryPool("cpu", 10, BB, torch.device("cpu"))
        assert store.read_buffers(ids, dst.buffers(list(range(10))), keys) == []
        assert torch.equal(dst.data, src.data[:10])
        if cut > 1:  # the request at slot 2 moves one block: slots 3.. of it are torn
            store.faults = Scripted({2: BB})
            torn = [ids.index(s) for s in range(3, 2 + cut)]
            assert store.read_buffers(ids, dst.buffers(list(range(10))), keys) == sorted(torn)
    finally:
        store.close()


def test_a_direct_request_is_one_call_and_a_slot_named_twice_keeps_its_last_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Direct, a read or write is one call into the compiled loop with
    io_threads * io_depth requests in flight; a write naming a slot twice runs one
    request at a time, so the later buffer is what the slot holds."""
    if file_store._io_vectored is None:
        pytest.skip("compiled I/O core not built")
    calls: list[tuple[bool, int, int]] = []
    vectored = file_store._io_vectored

    def counting(write: bool, fds: list[int], *args: Any) -> list[int]:
        calls.append((write, len(fds), args[-1]))
        return vectored(write, fds, *args)

    monkeypatch.setattr(file_store, "_io_vectored", counting)
    n = 40
    src = pool(2 * n, 5)
    slots = [2 * i for i in range(n)]  # no two adjacent: 40 requests
    store = FileStore("nvme", 2 * n, BB, str(tmp_path), io="direct", io_threads=2, io_depth=3)
    try:
        store.write_buffers(slots, src.buffers(list(range(n))))
        dst = MemoryPool("cpu", n, BB, torch.device("cpu"))
        store.read_buffers(slots, dst.buffers(list(range(n))))
        assert torch.equal(dst.data, src.data[:n])
        assert calls == [(True, n, 6), (False, n, 6)]
        calls.clear()
        # Every slot twice, the second time from rows n..2n-1: the second buffers win.
        store.write_buffers(slots + slots, src.buffers(list(range(2 * n))))
        assert calls == [(True, 2 * n, 1)]
        store.read_buffers(slots, dst.buffers(list(range(n))))
        assert torch.equal(dst.data, src.data[n:])
    finally:
        store.close()


@settings(max_examples=40, deadline=None)
@given(
    block_bytes=st.sampled_from([1, 3, 511, 4095, 4096, 4097, 8192, 12295]),
    stripes=st.integers(1, 7),
    num_blocks=st.integers(1, 40),
    io=st.sampled_from(["auto", "buffered", "direct"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_odd_block_sizes_and_stripes_reopen_byte_exact(
    block_bytes: int, stripes: int, num_blocks: int, io: str, seed: int
) -> None:
    # docs/durability.md: slot i lives in file i % stripes at (i // stripes) *
    # block_bytes; what a store indexed comes back byte-exact after a reopen,
    # also for slots rewritten under new keys before it.
    if io == "direct" and (block_bytes % 4096 or file_store._io_vectored is None):
        io = "buffered"
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as directory:
        store = FileStore("nvme", num_blocks, block_bytes, directory, stripes=stripes, io=io)
        want: dict[int, tuple[int, bytes]] = {}  # slot -> (key, bytes)
        key = 0
        for _ in range(2):
            slots = rng.sample(range(num_blocks), rng.randint(1, num_blocks))
            rows = torch.randint(0, 256, (len(slots), block_bytes), dtype=torch.uint8)
            keys = list(range(key, key + len(slots)))
            key += len(slots)
            store.write_from(slots, rows, list(keys))
            for slot, k, row in zip(slots, keys, rows):
                want[slot] = (k, row.numpy().tobytes())
        store.close()
        store = FileStore("nvme", num_blocks, block_bytes, directory, stripes=stripes, io=io)
        try:
            got = {e.slot: e.key for e in store.recovered()}
            assert got == {slot: k for slot, (k, _) in want.items()}
            ids = list(want)
            out = torch.empty(len(ids), block_bytes, dtype=torch.uint8)
            assert store.read_into(ids, out, [want[s][0] for s in ids]) == []
            for row, slot in zip(out, ids):
                assert row.numpy().tobytes() == want[slot][1]
            for stripe in range(stripes):
                name = "blocks.bin" if stripes == 1 else f"blocks.{stripe}.bin"
                data = (Path(directory) / name).read_bytes()
                for slot in range(stripe, num_blocks, stripes):
                    if slot in want:
                        at = slot // stripes * block_bytes
                        assert data[at : at + block_bytes] == want[slot][1]
        finally:
            store.close()
