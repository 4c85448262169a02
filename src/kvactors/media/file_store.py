"""The NVMe medium: :class:`FileStore`, slots in preallocated files read and written
with vectored ``preadv``/``pwritev`` (a request's slots sorted, each run of
adjacent slots one call, long requests spread over I/O threads), with
``O_DIRECT`` past the page cache (``nvme.io = "direct"``, the default on a real
directory) or through it (``"buffered"``). Every block written carries a CRC-32
kept in an on-disk index (:mod:`kvactors.media.nvme_index`) and checked when
read back; reopening the directory serves what was durably stored before.
Faults are injected through :attr:`FileStore.faults` (see :class:`~kvactors.media.faults.Faults`) on
the same calls.

Opening the directory (its lock, sizes, index, block files, the ``O_DIRECT``
choice) is in :mod:`kvactors.media.file_open`, the system calls a request is cut
into in :mod:`kvactors.media.file_plan`; this module reads and writes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch

from kvactors.errors import ActorClosed, ConfigError, TransferError
from kvactors.keys import Key
from kvactors.media import file_plan
from kvactors.media.faults import Faults
from kvactors.media.file_open import DIRECT_ALIGN as DIRECT_ALIGN  # imported from here too
from kvactors.media.file_open import FileDirectory, startup_error
from kvactors.media.file_plan import Batch
from kvactors.media.kvikio_io import _KvikioIO
from kvactors.media.memory import _fan_out, row_buffers
from kvactors.media.nvme_index import Entry, checksum

try:
    from kvactors._io_core import vectored as _io_vectored
except ImportError:  # built without a C compiler: one system call per batch from Python
    _io_vectored = None  # type: ignore[assignment]


T = TypeVar("T")
MAX_BLOCKS = 2**32  # slots are u32 in the index records
DIRECT_DEPTH = 4  # direct requests in flight per I/O thread (measured in docs/benchmarks.md)
# The most bytes of one direct request: a longer run of adjacent slots is cut into
# requests of this size (at least one block), so several of them are in flight at
# once instead of one call for the whole run (measured in docs/benchmarks.md).
DIRECT_REQUEST_BYTES = 2**20


class FileStore(FileDirectory):
    """NVMe block slots in preallocated files under ``directory``, with an index.

    Slot ``s`` lives in file ``s % stripes`` (``blocks.bin`` for one stripe,
    ``blocks.K.bin`` for more). Buffered writes to one file serialise on its
    inode lock; spread over several files they run in parallel, one I/O thread
    per file. ``io`` is ``nvme.io`` (``"auto"``, ``"direct"``, ``"buffered"``,
    see :class:`~kvactors.config.NVMeConfig`); :attr:`io` says which one runs.
    A direct read or write is one call into the compiled loop that keeps up to
    ``io_threads * io_depth`` requests in flight (``io_depth`` per I/O thread),
    each at most ``DIRECT_REQUEST_BYTES`` (a longer run of adjacent slots is cut).

    ``directory=None`` makes a temporary directory, removed on :meth:`close`
    (and when opening fails). A directory is held by one process at a time: an
    ``flock`` on the directory itself, which no file deleted inside it releases;
    a second opener gets :class:`~kvactors.errors.CacheLockedError`. Opening
    checks sizes first (``num_blocks`` below 2**32, the files' bytes against
    the free space of the disk: :class:`~kvactors.errors.ConfigError` naming
    the field); an ``OSError`` while opening (permissions, a file where the
    directory should be, too many open files) is a
    :class:`~kvactors.errors.StoreOpenError` naming the path, and leaves
    nothing open. Blocks written with their keys are checksummed and indexed
    once their bytes are fsynced; :meth:`recovered` lists what a reopened
    directory still holds. ``fresh=True`` starts it empty instead: once the
    lock is held, the files a store keeps there (``index.*``, ``blocks.bin``,
    ``blocks.K.bin``) from an earlier opening are deleted, whatever geometry
    they had; other files are left alone.
    """

    in_memory = False

    def __init__(
        self,
        name: str,
        num_blocks: int,
        block_bytes: int,
        directory: str | None = None,
        *,
        durable: bool = True,
        fresh: bool = False,
        backend: str = "posix",
        io_threads: int = 2,
        stripes: int = 1,
        faults: Faults | None = None,
        io: str = "auto",
        io_depth: int = DIRECT_DEPTH,
    ) -> None:
        if stripes < 1:
            raise ConfigError(f"nvme.stripes must be at least 1, got {stripes}")
        if not 1 <= io_depth <= 64:
            raise ConfigError(f"io_depth must be in 1..64, got {io_depth}")
        self.io_depth = io_depth
        if not 1 <= num_blocks < MAX_BLOCKS:
            raise ConfigError(
                f"nvme.num_blocks must be between 1 and {MAX_BLOCKS - 1}, got {num_blocks}"
            )
        if block_bytes < 1:
            raise ConfigError(f"block_bytes must be positive, got {block_bytes}")
        self.name = name
        self.stripes = stripes
        self.backend = backend
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self.durable = durable
        self.fresh = fresh
        self.faults = faults
        self.corrupted = 0
        self.fds: list[int] = []
        self.direct_fds: list[int] = []  # O_DIRECT descriptors of the same files
        self._lock_fd = -1
        self._closed = False
        self._tmp = directory is None
        self._pool: ThreadPoolExecutor | None = None
        self._kvikio: _KvikioIO | None = None
        if directory is None:
            try:
                directory = tempfile.mkdtemp(prefix="kvactors-")
            except OSError as exc:
                raise startup_error(Path(tempfile.gettempdir()), exc) from exc
        self.directory = Path(directory)
        names = ["blocks.bin"] if stripes == 1 else [f"blocks.{k}.bin" for k in range(stripes)]
        self.paths = [self.directory / name for name in names]
        if io not in ("auto", "direct", "buffered"):
            raise ConfigError(f"nvme.io must be 'auto', 'direct' or 'buffered', got {io!r}")
        try:
            self._open(num_blocks, block_bytes, stripes)
            self.io = self._open_direct(io, compiled=_io_vectored is not None)
        except BaseException as exc:
            self._release()
            if self._tmp:
                shutil.rmtree(self.directory, ignore_errors=True)
            if isinstance(exc, OSError):
                raise startup_error(Path(exc.filename or self.directory), exc) from exc
            raise
        # I/O entry points of the Python path (kvikio replaces them).
        self.pwritev: Callable[..., int] = os.pwritev
        self.preadv: Callable[..., int] = os.preadv
        self.fdatasync: Callable[[int], None] = os.fdatasync
        self.io_threads = io_threads
        self._pool = ThreadPoolExecutor(io_threads, "kvactors-io") if io_threads > 1 else None
        if backend == "kvikio":
            self._kvikio = _KvikioIO(dict(zip(self.fds, self.paths)))
            self.pwritev = self._kvikio.pwritev
            self.preadv = self._kvikio.preadv

    def tensor(self) -> None:
        """Not a memory medium: bytes move through ``read_buffers`` / ``write_buffers``."""
        return None

    def recovered(self) -> list[Entry]:
        """Blocks the directory held when opened, oldest first (not yet verified)."""
        return self.index.entries()

    def read_into(
        self, ids: list[int], rows: torch.Tensor, keys: list[Key] | None = None
    ) -> list[int]:
        """Read slots into ``rows``; returns the positions whose bytes failed the
        checksum of ``keys`` (or are not indexed under that key)."""
        host = rows if rows.device.type == "cpu" else torch.empty_like(rows, device="cpu")
        bad = self.read_buffers(ids, row_buffers(host, range(host.shape[0])), keys)
        if host is not rows:
            rows.copy_(host)
        return bad

    def read_buffers(
        self, ids: list[int], bufs: list[memoryview], keys: list[Key] | None = None
    ) -> list[int]:
        """Read slot ``ids[i]`` into ``bufs[i]`` (one block each), one ``preadv`` per
        run of adjacent slots in slot order; verify against ``keys`` as :meth:`read_into`.

        Without ``keys`` an I/O error or a short read raises
        :class:`~kvactors.errors.TransferError`; with ``keys`` the blocks it
        touched are reported bad instead. Either way every read has finished
        (no I/O thread still writes into ``bufs``) when this returns or raises.
        """
        self._check_open("read")
        bb = self.block_bytes

        def read_done(batch: Batch, got: int | OSError) -> list[int]:
            slot, positions = batch
            n = len(positions)
            want = n * bb
            if isinstance(got, OSError):
                if keys is None:
                    where = self._slots(slot, n)
                    raise TransferError(f"{self.name}: reading {where} failed: {got}") from got
                got = 0  # with keys, unreadable blocks are misses, not errors
            if got != want:
                if keys is None:
                    where = self._slots(slot, n)
                    raise TransferError(f"{self.name}: short read of {where}: {got} of {want}")
                # Blocks past the end of a short read are torn: never data.
                return positions[got // bb :]
            return []

        batches = self._plan(ids)
        if self._one_call(False):  # all its requests share io_threads * io_depth threads
            results = self._runner(False, bufs, read_done, self._direct_depth())(batches)
        else:
            results = self._in_stretches(self._runner(False, bufs, read_done), batches)
        torn = {pos for bad in results for pos in bad}
        if keys is None:
            return []
        crcs = self.index.match(ids, keys)
        bad = [
            pos
            for pos, crc in enumerate(crcs)
            if pos in torn or crc < 0 or checksum(bufs[pos]) != crc
        ]
        self.corrupted += len(bad)
        return bad

    def _one_call(self, write: bool) -> bool:
        """Direct I/O on the compiled loop: a request's system calls are one call
        (the Python path, with entry points replaced, runs in stretches)."""
        plain = os.pwritev if write else os.preadv
        return bool(self.direct_fds) and (self.pwritev if write else self.preadv) is plain

    def _direct_depth(self) -> int:
        """Direct requests in flight for one read or write: ``io_depth`` per I/O thread."""
        return min(64, self.io_threads * self.io_depth)

    def _plan(self, ids: list[int]) -> list[Batch]:
        """The system calls of a request: runs of adjacent slots (``batches``);
        direct, runs cut to at most ``DIRECT_REQUEST_BYTES`` each, so a long run
        is several requests in flight rather than one."""
        runs = file_plan.batches(ids, self.stripes)
        if not self.direct_fds:
            return runs
        most = max(1, DIRECT_REQUEST_BYTES // self.block_bytes)
        return file_plan.pieces(runs, self.stripes, most)

    def _slots(self, slot: int, n: int) -> str:
        last = slot + (n - 1) * self.stripes
        every = f" (every {self.stripes})" if self.stripes > 1 else ""
        return f"slots {slot}..{last}{every}"

    def _runner(
        self,
        write: bool,
        bufs: list[memoryview],
        done: Callable[[Batch, int | OSError], T],
        depth: int = 1,
    ) -> Callable[[list[Batch]], list[T]]:
        """What runs one group of batches: their system calls, each batch's result
        through ``done`` (bytes done, or the error), stopping at the first raise.

        With the compiled I/O core and the plain POSIX calls, one C call does the
        whole group's system calls with the GIL released (on the ``O_DIRECT``
        descriptors in direct mode, up to ``depth`` batches in flight), then
        ``done`` judges them; otherwise each
        batch is one ``preadv``/``pwritev`` from Python on the buffered
        descriptors (no compiler, kvikio, or entry points replaced). Either
        way :attr:`faults` is asked about every batch first.
        """
        bb, stripes, fds = self.block_bytes, self.stripes, self.fds
        call = self.pwritev if write else self.preadv
        faults = self.faults

        def plan(group: list[Batch]) -> list[int] | None:
            if faults is None:
                return None
            return [
                faults.on_io(write, slot % stripes, slot // stripes * bb, len(positions) * bb)
                for slot, positions in group
            ]

        if _io_vectored is not None and call is (os.pwritev if write else os.preadv):
            nfds, align = (self.direct_fds, DIRECT_ALIGN) if self.direct_fds else (fds, 0)
            depth = depth if self.direct_fds else 1

            def run_native(group: list[Batch]) -> list[T]:
                got = _io_vectored(
                    write,
                    [nfds[slot % stripes] for slot, _ in group],
                    [slot // stripes * bb for slot, _ in group],
                    [len(positions) for _, positions in group],
                    [bufs[p] for _, positions in group for p in positions],
                    plan(group),
                    align,
                    depth,
                )
                if faults is not None and not write:
                    for (_, positions), n in zip(group, got):
                        if n > 0:
                            faults.on_read([bufs[p] for p in positions])
                return [
                    done(batch, n if n >= 0 else OSError(-n, os.strerror(-n)))
                    for batch, n in zip(group, got)
                ]

            return run_native

        def one(batch: Batch, injected: int) -> T:
            slot, positions = batch
            fd, offset = fds[slot % stripes], slot // stripes * bb
            views = [bufs[p] for p in positions]
            got: int | OSError
            if injected < 0:
                got = OSError(-injected, os.strerror(-injected))
            else:
                try:
                    cut = file_plan.first_bytes(views, injected)
                    got = file_plan.vectored(call, fd, cut, offset)
                except OSError as exc:
                    got = exc
                if faults is not None and not write and isinstance(got, int) and got > 0:
                    faults.on_read(views)
            return done(batch, got)

        def run_python(group: list[Batch]) -> list[T]:
            plans = plan(group) or [0] * len(group)
            return [one(batch, injected) for batch, injected in zip(group, plans)]

        return run_python

    def _in_stretches(self, run: Callable[[list[Batch]], list[T]], batches: list[Batch]) -> list[T]:
        """``run`` over ``batches``; with many, over contiguous stretches of them on
        the store's I/O threads (reads of one file run in parallel)."""
        if self._pool is None or len(batches) < 16:
            return run(batches)
        step = -(-len(batches) // self.io_threads)
        return self._in_groups(run, [batches[i : i + step] for i in range(0, len(batches), step)])

    def _in_groups(
        self, run: Callable[[list[Batch]], list[T]], groups: list[list[Batch]]
    ) -> list[T]:
        """``run`` over each group of batches, the groups on the I/O threads.

        A group stops at its first error; every group has stopped before the
        first error (in group order) is re-raised, so no worker touches the
        caller's buffers after this returns or raises.
        """
        if self._pool is None or len(groups) < 2:
            return [result for group in groups for result in run(group)]
        return [result for part in _fan_out(self._pool, run, groups) for result in part]

    def write_from(self, ids: list[int], rows: torch.Tensor, keys: list[Key] | None = None) -> None:
        """Write ``rows`` into slots, fsync them, then index them under ``keys``."""
        host = rows.cpu().contiguous()
        self.write_buffers(ids, row_buffers(host, range(host.shape[0])), keys)

    def write_buffers(
        self, ids: list[int], bufs: list[memoryview], keys: list[Key] | None = None
    ) -> None:
        """Write ``bufs[i]`` into slot ``ids[i]``, one ``pwritev`` per run of adjacent
        slots in slot order; with ``keys``, fsync the bytes and then index them.

        An ``OSError`` (or :class:`~kvactors.errors.TransferError` for a short
        write) is raised once the runs before it in slot order are written; then
        nothing is indexed and the slots hold unknown bytes.
        """
        self._check_open("write")
        bb = self.block_bytes
        stripes = self.stripes
        # The slots' old records are superseded by the new ones below; a crash in
        # between leaves old records over new bytes, which fail their checksum.

        def write_done(batch: Batch, done: int | OSError) -> None:
            if isinstance(done, OSError):
                raise done
            slot, positions = batch
            n = len(positions)
            if done != n * bb:
                where = self._slots(slot, n)
                raise TransferError(f"{self.name}: short write of {where}: {done} of {n * bb}")

        # Buffered writes to one file serialize on its inode lock, so threads help
        # only across files: one group per file (measured in docs/benchmarks.md).
        # Direct writes are one call whose requests share io_threads * io_depth
        # threads, each taking the next request in file order.
        batches = self._plan(ids)
        files = [[b for b in batches if b[0] % stripes == k] for k in range(stripes)]
        if self._one_call(True):
            # Requests in flight at once must not write one slot twice (the last
            # buffer wins): a request naming a slot twice runs one at a time.
            depth = self._direct_depth() if len(set(ids)) == len(ids) else 1
            self._runner(True, bufs, write_done, depth)(batches)
        else:
            self._in_groups(self._runner(True, bufs, write_done), [g for g in files if g])
        if keys is None:
            return
        if self.durable:
            for k, group in enumerate(files):
                if group:
                    self.fdatasync(self.fds[k])
        items = [(key, slot, checksum(buf)) for key, slot, buf in zip(keys, ids, bufs)]
        self.index.put(items, sync=self.durable)

    def drop(self, keys: list[Key]) -> None:
        """Remove the index records of ``keys`` (their slots' bytes stay until reused)."""
        self._check_open("drop")
        self.index.delete(keys)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ActorClosed(f"{self.name}: {what} after the store was closed")

    def close(self) -> None:
        """Release the files; later reads, writes and drops raise ActorClosed."""
        self._closed = True
        if self._lock_fd < 0:
            return
        if self._pool is not None:
            self._pool.shutdown()
        self.index.close()
        if self._kvikio is not None:
            self._kvikio.close()
        self._release()
        if self._tmp:
            shutil.rmtree(self.directory, ignore_errors=True)
