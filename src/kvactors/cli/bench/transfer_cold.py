"""The cold rows of ``kvactors bench transfer``: the store as ``nvme.io``
configures it, every write followed by ``fdatasync`` and every read preceded by
evicting the files from the page cache, against the device's own best
sequential direct I/O of the same bytes (:class:`DirectSequential`).

:mod:`kvactors.cli.bench.transfer` (the command, the other rows, the table)
turns the times measured here into rows.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kvactors.media import FileStore, MemoryPool
from kvactors.media.file_store import DIRECT_ALIGN, DIRECT_DEPTH

try:
    from kvactors._io_core import vectored as _io_vectored
except ImportError:  # built without a C compiler
    _io_vectored = None  # type: ignore[assignment]

__all__ = ["Best", "DirectSequential", "best_of", "evict", "measure_cold"]

Best = tuple[float, float, list[tuple[float, float]]]
"""Best measured time, best baseline time, every round's ``(baseline, measured)``."""


def best_of(rounds: list[tuple[float, float]]) -> Best:
    """The best measured and best baseline time of rounds of ``(base, fn)`` times,
    and the rounds themselves (a row's figures in :mod:`kvactors.cli.bench.transfer`)."""
    return min(f for _, f in rounds), min(b for b, _ in rounds), rounds


def evict(fds: list[int]) -> None:
    """Drop files from the page cache: flush them, then ``POSIX_FADV_DONTNEED``."""
    for fd in fds:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


class DirectSequential:
    """The device's best sequential direct I/O of ``n`` blocks of ``size`` bytes:
    calling it times one pass of an ``O_DIRECT`` file in file order, in
    one-block requests with 1, 2, 4, 8 and 16 in flight (writes end with
    ``fdatasync``), and returns the best. The requests run on the compiled I/O
    loop the store uses (threads taking the next block in order), so no Python
    per request limits the baseline; without the compiled core, Python threads
    each walk a contiguous part of the file, one ``pwritev``/``preadv`` per block.

    Block ``i`` of the file moves to or from ``rows[i]``: the same CPU pool rows
    the store's pass moves, so both sides differ only in their requests (why
    that matters is measured in docs/benchmarks.md)."""

    def __init__(self, path: Path, size: int, n: int, write: bool, rows: list[memoryview]) -> None:
        self.size, self.n, self.write = size, n, write
        self.rows = rows
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
        os.ftruncate(self.fd, n * size)

    def one(self, threads: int) -> float:
        size, fd, n, blocks = self.size, self.fd, self.n, self.rows
        t0 = time.perf_counter()
        if _io_vectored is not None:
            # The compiled loop the store runs, here in plain sequential order:
            # one-block requests, ``threads`` of them in flight.
            done = _io_vectored(
                self.write,
                [fd] * n,
                [i * size for i in range(n)],
                [1] * n,
                blocks,
                None,
                DIRECT_ALIGN,
                threads,
            )
            if any(d != size for d in done):
                raise OSError(f"direct baseline: a {size}-byte request moved {min(done)}")
        else:
            per = -(-n // threads)
            call = os.pwritev if self.write else os.preadv

            def walk(t: int) -> None:
                for i in range(t * per, min(n, (t + 1) * per)):
                    if call(fd, [blocks[i]], i * size) != size:
                        raise OSError(f"direct baseline: a short {size}-byte request")

            with ThreadPoolExecutor(threads) as workers:
                for part in [workers.submit(walk, t) for t in range(threads)]:
                    part.result()  # a failed request raises here
        if self.write:
            os.fdatasync(fd)
        return time.perf_counter() - t0

    def __call__(self) -> float:
        return min(self.one(t) for t in (1, 2, 4, 8, 16))

    def close(self) -> None:
        os.close(self.fd)


def measure_cold(
    size: int,
    n: int,
    repeat: int,
    cpu: MemoryPool,
    dst_ids: list[int],
    directory: Path,
    rng: random.Random,
    stripes: int,
    io: str,
    io_depth: int = DIRECT_DEPTH,
) -> list[tuple[str, Best]]:
    """The cold rows of one block size: for writes and reads, the row's path and
    the best-of times of the store's pass against the direct baseline
    (:func:`best_of` of ``repeat`` interleaved rounds, after one warm-up)."""
    store = FileStore(
        "nvme",
        2 * n,
        size,
        str(directory / f"c{size}"),
        durable=True,
        io_threads=max(2, stripes),
        stripes=stripes,
        io=io,
        io_depth=io_depth,
    )
    ids = rng.sample(range(2 * n), n)
    bufs = cpu.buffers(dst_ids)
    write_base: DirectSequential | None = None
    read_base: DirectSequential | None = None
    try:
        # The read baseline's file holds written bytes (not holes, which read as zeros).
        write_base = DirectSequential(directory / f"dr{size}.bin", size, n, True, bufs)
        write_base()
        write_base.close()
        read_base = DirectSequential(directory / f"dr{size}.bin", size, n, False, bufs)
        write_base = DirectSequential(directory / f"dw{size}.bin", size, n, True, bufs)

        def write_blocks() -> float:
            t0 = time.perf_counter()
            store.write_buffers(ids, bufs)
            for fd in store.fds:
                os.fdatasync(fd)
            return time.perf_counter() - t0

        def read_blocks() -> float:
            evict(store.fds)
            t0 = time.perf_counter()
            store.read_buffers(ids, bufs)
            return time.perf_counter() - t0

        label = f"nvme {store.io}"
        out: list[tuple[str, Best]] = []
        for path, fn, base in (
            (f"cpu -> {label} (cold)", write_blocks, write_base),
            (f"{label} -> cpu (cold)", read_blocks, read_base),
        ):
            fn()
            out.append((path, best_of([(base(), fn()) for _ in range(repeat)])))
        return out
    finally:
        store.close()
        for b in (write_base, read_base):
            if b is not None:
                b.close()
        shutil.rmtree(directory / f"c{size}", ignore_errors=True)
        for name in (f"dw{size}.bin", f"dr{size}.bin"):
            (directory / name).unlink(missing_ok=True)
