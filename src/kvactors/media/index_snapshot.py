"""The NVMe index's files on disk: naming the logs, reading a snapshot or a log
into the table, and writing snapshots.

:class:`SnapshotFiles` is the part of :class:`~kvactors.media.nvme_index.NVMeIndex`
that moves whole index files (the module docstring of
:mod:`kvactors.media.nvme_index` gives the layout and its crash argument): a
record snapshot (any table) or a table snapshot (the compiled table's own arrays,
read straight into it), and the chunked reader that applies records from a file.
"""

from __future__ import annotations

import os
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from kvactors.errors import IndexDamagedError
from kvactors.media.index_format import (
    PAGE,
    SNAP_HEAD,
    SNAP_MAGIC,
    TABLE_HEAD,
    TABLE_VERSION,
    TSNAP_MAGIC,
    VERSION,
    fsync_dir,
    pwrite_all,
    read_head,
    round_page,
)
from kvactors.media.index_table import IndexTable, NativeTable

if TYPE_CHECKING:
    from kvactors._nvme_index import Table as NativeTableType

__all__ = ["CHUNK_SLOTS", "LOAD_HOW", "READ_BYTES", "SNAP_CHUNKS", "SnapshotFiles", "SnapshotLoad"]

CHUNK_SLOTS = 1 << 14  # slots copied per lock hold while a record snapshot is written
SNAP_CHUNKS = 256  # chunks with long keys (4-6 KiB each) copied per lock hold
SNAP_COPY_HOLD_US = 0  # tests: a pause inside each chunk's copy (see Table.snap_copy)
READ_BYTES = 16 << 20  # index files are read and applied this many bytes at a time
SnapshotLoad = Literal["read", "direct", "mmap"]
"""How a table snapshot is read: ``read`` (into fresh anonymous memory), ``direct``
(the same with O_DIRECT, falling back to ``read`` where the file system refuses
it) or ``mmap`` (MAP_PRIVATE | MAP_POPULATE of the file itself)."""
LOAD_HOW: dict[str, int] = {"read": 0, "direct": 1, "mmap": 2}


class SnapshotFiles:
    """Reading and writing the index's snapshot and log files (a base of
    :class:`~kvactors.media.nvme_index.NVMeIndex`, whose state it uses)."""

    directory: Path
    block_bytes: int
    num_blocks: int
    stripes: int
    sync: bool
    meta_path: Path
    snap_path: Path
    lock: threading.Lock
    table: IndexTable
    snapshot_load: SnapshotLoad
    snapshot_format: int
    log_records: int
    compactions: int
    longest_hold_s: float
    _old_records: int
    _snap_fd: int
    _tmp_path: Path

    def _log_path(self, gen: int) -> Path:
        return self.directory / f"index.{gen}.log"

    def _logs(self) -> list[int]:
        """The generations of the logs there, in order: only the names the index
        writes (``index.G.log``, ``G`` in ASCII decimal without leading zeros),
        others (``index.01.log``, other digits) are not its files."""
        gens = []
        for path in self.directory.glob("index.*.log"):
            middle = path.name[len("index.") : -len(".log")]
            if middle.isascii() and middle.isdigit() and str(int(middle)) == middle:
                gens.append(int(middle))
        return sorted(gens)

    def _apply_file(self, path: Path, start: int) -> tuple[int, int, bool]:
        """Apply the records of ``path`` from byte ``start``, read a chunk at a time
        into one buffer (no copy of the whole file in memory); ``(applied, end,
        intact)``: ``end`` is where the records applied end, ``intact`` whether
        that is the end of the file."""
        buf = bytearray(READ_BYTES + 65536)
        view = memoryview(buf)
        have = 0
        pos = start  # file offset of buf[0]
        applied = 0
        with open(path, "rb") as fh:
            fh.seek(start)
            while True:
                got = fh.readinto(view[have:READ_BYTES])
                have += got
                if have == 0:
                    return applied, pos, True
                n, end, ok = self.table.apply(view[:have], 0)
                applied += n
                if ok == 0 or (ok == 2 and got == 0):
                    return applied, pos + end, False  # a bad record, or cut short at the end
                rest = have - end
                buf[:rest] = buf[end:have]
                pos += end
                have = rest
                if got == 0:
                    return applied, pos, True

    def _load_snapshot(self) -> int:
        """Load the snapshot (either format); the generation it covers, -1 if damaged
        (what verified is kept in the table)."""
        data = read_head(self.snap_path, PAGE)
        if data[:8] == TSNAP_MAGIC:
            return self._load_table_snapshot(data)
        if len(data) < SNAP_HEAD.size:
            return -1
        magic, version, stripes, gen, count, bb, nb, _, crc = SNAP_HEAD.unpack_from(data)
        if magic != SNAP_MAGIC or zlib.crc32(data[: SNAP_HEAD.size - 4]) != crc:
            return -1
        if version != VERSION:
            raise IndexDamagedError(f"{self.snap_path}: version {version} not supported")
        self._check_geometry(bb, nb, stripes)
        applied, _, intact = self._apply_file(self.snap_path, SNAP_HEAD.size)
        self.snapshot_format = VERSION
        return gen if intact and applied == count else -1

    def _check_geometry(self, bb: int, nb: int, stripes: int) -> None:
        if (bb, nb, stripes) != (self.block_bytes, self.num_blocks, self.stripes):
            raise IndexDamagedError(
                f"{self.snap_path} describes {bb} x {nb} blocks over {stripes} "
                f"file(s), {self.meta_path.name} {self.block_bytes} x "
                f"{self.num_blocks} over {self.stripes}"
            )

    def _compiled(self) -> NativeTableType | None:
        table = self.table
        if NativeTable is not None and isinstance(table, NativeTable):
            return table
        return None

    @property
    def _native(self) -> NativeTableType:
        table = self._compiled()
        assert table is not None, "the compiled table's own snapshot needs the compiled table"
        return table

    def _table_layout(self) -> dict[str, int]:
        """Where a table snapshot puts each part (page-aligned, in this order): the
        header page, the chunks' CRC-32Cs, the record array, the bucket array, the
        keys of more than 32 bytes."""
        layout: dict[str, int] = dict(self._native.layout)
        crcs_off = PAGE
        recs_off = crcs_off + round_page(4 * layout["chunks"])
        ht_off = recs_off + round_page(layout["recs_bytes"])
        long_off = ht_off + round_page(layout["ht_bytes"])
        layout.update(crcs_off=crcs_off, recs_off=recs_off, ht_off=ht_off, long_off=long_off)
        return layout

    def _load_table_snapshot(self, head: bytes) -> int:
        """The compiled table's own arrays, read straight into it (docs/durability.md)."""
        if len(head) < TABLE_HEAD.size or zlib.crc32(head[: TABLE_HEAD.size - 4]) != int.from_bytes(
            head[TABLE_HEAD.size - 4 : TABLE_HEAD.size], "little"
        ):
            return -1  # a torn or garbage header: nothing in the file can be trusted
        (
            _, version, stripes, gen, bb, nb, live, max_seq, seed, buckets, rec_bytes,
            slot_bits, rec_chunk, ht_chunk, chunks, crcs_crc, crcs_off, recs_off, ht_off,
            long_off, long_len, long_count, long_crc, dist_max, _,
        ) = TABLE_HEAD.unpack_from(head)  # fmt: skip
        if version != TABLE_VERSION:
            raise IndexDamagedError(
                f"{self.snap_path}: table snapshot version {version} is not supported"
            )
        self._check_geometry(bb, nb, stripes)
        if self._compiled() is None:
            raise IndexDamagedError(
                f"{self.snap_path} is a table snapshot (format {TABLE_VERSION}, written by "
                "the compiled index kvactors._nvme_index), which this installation lacks: "
                "reinstall kvactors with a C compiler to reopen this directory"
            )
        layout = self._table_layout()
        found = {
            "rec_bytes": rec_bytes, "buckets": buckets, "slot_bits": slot_bits,
            "rec_chunk": rec_chunk, "ht_chunk": ht_chunk, "chunks": chunks,
            "crcs_off": crcs_off, "recs_off": recs_off, "ht_off": ht_off,
            "long_off": long_off, "dist_max": dist_max,
        }  # fmt: skip
        mine = {name: layout[name] for name in found}
        if mine != found:
            raise IndexDamagedError(
                f"{self.snap_path}: a table snapshot of another layout ({found}); this "
                f"build's is {mine}"
            )
        fd = os.open(self.snap_path, os.O_RDONLY)
        try:
            crcs = os.pread(fd, 4 * chunks, crcs_off)
            longs = os.pread(fd, long_len, long_off) if long_len else b""
            if len(crcs) != 4 * chunks or zlib.crc32(crcs) != crcs_crc:
                return -1  # no chunk can be checked
            if len(longs) != long_len or zlib.crc32(longs) != long_crc:
                longs = b""  # the entries with long keys are dropped, the rest kept
            how = LOAD_HOW[self.snapshot_load]
            read_fd = fd
            if how == 1:
                try:
                    read_fd = os.open(self.snap_path, os.O_RDONLY | os.O_DIRECT)
                except OSError:  # a file system without O_DIRECT (tmpfs)
                    how = 0
            try:
                try:
                    bad, dropped = self._native.load(
                        read_fd, how, recs_off, ht_off, seed, live, max_seq, crcs, longs,
                        long_count,
                    )  # fmt: skip
                except OSError:
                    if how != 1:
                        raise
                    # O_DIRECT refused at read time (alignment rules of this file system)
                    bad, dropped = self._native.load(
                        fd, 0, recs_off, ht_off, seed, live, max_seq, crcs, longs, long_count
                    )
            finally:
                if read_fd != fd:
                    os.close(read_fd)
            if how == 0:
                # Read into the table: the page cache need not hold a second copy.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        self.snapshot_format = TABLE_VERSION
        return gen if bad == 0 and dropped == 0 and len(longs) == long_len else -1

    def _end_table_snapshot(self) -> tuple[int, int, bytes, bytes, int, int] | None:
        """Stop the table snapshot being taken (the lock held); its fd closed."""
        got = self._native.snap_end()
        if self._snap_fd >= 0:
            os.close(self._snap_fd)
            self._snap_fd = -1
        return got

    def _table_snapshot(self, gen: int) -> None:
        """Finish the table snapshot begun at the rotation to ``gen``: the chunks no
        store has saved yet (copied without the lock; those holding keys of more
        than 32 bytes SNAP_CHUNKS per lock hold), then the chunks' CRCs, the long
        keys and the header; fsync, rename, fsync the directory."""
        tmp = self._tmp_path
        fd = os.dup(self._snap_fd)
        try:
            self._native.snap_copy(SNAP_COPY_HOLD_US)  # neither the lock nor the GIL held
            done = False
            while not done:
                with self.lock:  # copies chunks: the disk is written without the lock
                    t0 = time.perf_counter()
                    done = self._native.snap_step(SNAP_CHUNKS)
                    held = time.perf_counter() - t0
                self.longest_hold_s = max(self.longest_hold_s, held)
                self._native.snap_flush()
            self._native.snap_flush()  # what stores copied since
            with self.lock:
                got = self._end_table_snapshot()
            assert got is not None
            live, max_seq, crcs, longs, long_count, err = got
            if err:
                raise OSError(err, os.strerror(err), str(tmp))
            layout = self._table_layout()
            pwrite_all(fd, crcs, layout["crcs_off"])
            if longs:
                pwrite_all(fd, longs, layout["long_off"])
            head = TABLE_HEAD.pack(
                TSNAP_MAGIC, TABLE_VERSION, self.stripes, gen, self.block_bytes,
                self.num_blocks, live, max_seq, self._native.seed,
                layout["buckets"], layout["rec_bytes"], layout["slot_bits"],
                layout["rec_chunk"], layout["ht_chunk"], layout["chunks"], zlib.crc32(crcs),
                layout["crcs_off"], layout["recs_off"], layout["ht_off"], layout["long_off"],
                len(longs), long_count, zlib.crc32(longs), layout["dist_max"], 0,
            )[:-4]  # fmt: skip
            pwrite_all(fd, head + struct.pack("<I", zlib.crc32(head)), 0)
            if self.sync:
                os.fsync(fd)
        except BaseException:
            with self.lock:
                if self._snap_fd >= 0:
                    self._end_table_snapshot()
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        self._commit_snapshot(tmp, gen)

    def _commit_snapshot(self, tmp: Path, gen: int) -> None:
        os.replace(tmp, self.snap_path)
        if self.sync:
            fsync_dir(self.directory)
        with self.lock:
            retired = [self._log_path(old) for old in self._logs() if old < gen]
            self.log_records -= self._old_records
            self._old_records = 0
            self.compactions += 1
        for path in retired:  # unlinking a large file takes a while: not under the lock
            path.unlink(missing_ok=True)

    def _snapshot(self, gen: int) -> None:
        if self._snap_fd >= 0:
            self._table_snapshot(gen)
            return
        tmp = self._tmp_path
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        count = 0
        h = 0
        try:
            os.write(fd, bytes(SNAP_HEAD.size))
            for lo in range(0, self.num_blocks, CHUNK_SLOTS):
                with self.lock:
                    data, n = self.table.dump(lo, lo + CHUNK_SLOTS)
                if data:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                count += n
            head = SNAP_HEAD.pack(
                SNAP_MAGIC,
                VERSION,
                self.stripes,
                gen,
                count,
                self.block_bytes,
                self.num_blocks,
                0,
                0,
            )[:-4]
            h = zlib.crc32(head)
            os.pwrite(fd, head + struct.pack("<I", h), 0)
            if self.sync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        self._commit_snapshot(tmp, gen)
