"""The NVMe tier's on-disk index: which key is in which slot, with its checksum.

Files under the cache directory (all little-endian, every record CRC-32 framed):

- ``index.meta``: the geometry (``block_bytes``, ``num_blocks``, ``stripes``),
  written atomically (temporary file, fsync, rename, fsync of the directory)
  *before* any block file exists, and never rewritten: a directory is reopened
  with the geometry it was made with, or refused.
- ``index.snap``: every live entry at the last compaction (a header naming the
  log generation it covers and the record count, then the records), replaced
  atomically.
- ``index.G.log``: records appended since the rotation that started generation
  ``G``; replayed in generation order over the snapshot on reopen. A torn or
  corrupt tail (a crash in the middle of an append) ends the replay of that log
  and is cut off.

A record is 24 bytes plus the key, padded to 8 bytes:
``u32 crc32(rest) | u8 op | u8 kind | u16 key length | u32 slot | u32 block crc32 |
u64 sequence | key``. Every update carries a sequence number; an update older than
what the table already holds for its slot or key is ignored, so replay order
across a snapshot taken while stores went on does not matter.

The live table is compact: with the compiled core (``kvactors._nvme_index``) a
fixed 48-byte record per slot (keys of up to 32 bytes inline) plus a 4-byte
open-addressing hash of keys, no Python object per block; without it, a Python
reference table of dicts that behaves the same.

Crash safety, and where fsync matters:

- block bytes are fsynced *before* the ``Put`` records naming them are
  appended, and the log is fsynced before a write job reports success: a block
  reported stored survives a crash at any later instant;
- evictions write nothing: the slot's next ``Put`` supersedes the old key. A
  crash between the new bytes and the new record leaves the old record over
  new bytes; its checksum no longer matches, so the block is a miss when read;
- ``Del`` records (integrity failures, explicit drops) are appended without
  fsync: losing one only brings back a record whose checksum check fails again
  (or, for a drop, a block whose bytes are still exact).

The code: record framing and file helpers in :mod:`kvactors.media.index_format`,
the live table in :mod:`kvactors.media.index_table`, snapshot and log files in
:mod:`kvactors.media.index_snapshot`, the geometry record and recovery at open in
:mod:`kvactors.media.index_recovery`; this module keeps the log appends, the
updates and the scheduling of compactions.

Compaction starts when the logs hold more records than ``max(MIN_LOG_RECORDS,
live entries)``: under the lock it only rotates to a new log generation; a
background thread then copies the table a chunk of slots at a time (the lock
held for one chunk), writes ``index.snap.tmp``, fsyncs it, renames it over
``index.snap``, fsyncs the directory and only then deletes the older logs. A
crash at any point reopens from the previous snapshot and every log after it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from kvactors.keys import Key
from kvactors.media.index_format import OP_DEL, OP_PUT, Entry, checksum, encode, frame, gc_paused
from kvactors.media.index_recovery import IndexRecovery
from kvactors.media.index_snapshot import SnapshotLoad
from kvactors.media.index_table import new_table

__all__ = ["MIN_LOG_RECORDS", "Entry", "NVMeIndex", "checksum"]

MIN_LOG_RECORDS = 1024
# Compaction starts past max(MIN_LOG_RECORDS, min(live, num_blocks / COMPACT_DIVISOR))
# log records: a reopen replays at most about num_blocks / 16 records after reading
# the snapshot, and a snapshot (at most the table's size) is written once per that
# many records at most.
COMPACT_DIVISOR = 16


class _ByKey(Mapping[Key, Entry]):
    """A read-only view of the index by key."""

    def __init__(self, index: NVMeIndex) -> None:
        self._index = index

    def __getitem__(self, key: Key) -> Entry:
        table = self._index.table
        slot = table.find(key)
        got = table.get(slot) if slot >= 0 else None
        if got is None:
            raise KeyError(key)
        return Entry(key, slot, got[1])

    def __contains__(self, key: object) -> bool:
        return isinstance(key, (bytes, int)) and self._index.table.find(key) >= 0

    def __iter__(self) -> Iterator[Key]:
        return iter([key for key, _, _ in self._index.table.entries()])

    def __len__(self) -> int:
        return len(self._index.table)


class NVMeIndex(IndexRecovery):
    """Key -> (slot, checksum) for one cache directory; see the module docstring.

    Thread-safe: updates and lookups take :attr:`lock`; a background compaction
    takes it for one chunk of slots at a time.

    ``data_files`` names the block files: if any exists while ``index.meta``
    does not, the directory's geometry is unknown and it is refused
    (:class:`~kvactors.errors.IndexDamagedError`) rather than reshaped.
    """

    def __init__(
        self,
        directory: Path,
        block_bytes: int,
        num_blocks: int,
        stripes: int = 1,
        *,
        data_files: list[Path] | None = None,
        sync: bool = True,
        native: bool | None = None,
        snapshot_load: SnapshotLoad = "direct",
    ) -> None:
        self.directory = directory
        self.block_bytes = block_bytes
        self.num_blocks = num_blocks
        self.stripes = stripes
        self.sync = sync
        self.snapshot_load = snapshot_load
        self.meta_path = directory / "index.meta"
        self.snap_path = directory / "index.snap"
        self.lock = threading.Lock()
        self.table = new_table(num_blocks, native)
        self.by_key = _ByKey(self)
        self.torn_tail = False
        self.quarantined: list[Path] = []
        self.log_records = 0  # records in the logs not covered by the snapshot
        self.compactions = 0
        self.compaction_waits = 0  # updates that waited for a compaction to finish
        self.compaction_error: BaseException | None = None
        self._compactor: threading.Thread | None = None  # the thread compacting now
        self._idle = threading.Condition(self.lock)  # notified when a compaction ends
        self._worker: threading.Thread | None = None  # runs background compactions
        self._wake = threading.Event()
        self._stopping = False
        self._compactions_started = 0
        self._old_records = 0  # records in logs the running compaction will retire
        self._log_fd = -1
        self._snap_fd = -1  # the table snapshot being taken
        self._tmp_path = self.snap_path.with_name("index.snap.tmp")
        self.snapshot_format = 0  # of the snapshot loaded at open (0: none)
        self.load_seconds = (0.0, 0.0)  # wall seconds of the open: snapshot, logs
        self.longest_hold_s = 0.0  # the longest a compaction step held the lock
        self.longest_rotation_s = 0.0  # the longest a log rotation took (the lock held)
        self.slowest_put: tuple[float, ...] = (0.0,) * 6
        self.longest_compaction_wait_s = 0.0
        self._remove_stale()  # before index.meta.tmp is written for a new directory
        self._check_meta(data_files or [])
        self.gen = self._load()
        self._seq = self.table.max_seq
        self._open_log()
        if self.quarantined or self.torn_tail:
            self.compact()  # what verified, durable on its own again

    # -- the log --------------------------------------------------------------------

    def _open_log(self) -> None:
        self._log_fd = self._create_log(self.gen)

    def _append(self, data: bytes, records: int, sync: bool) -> None:
        """Append framed records (the lock held). On failure (a full disk) the log
        is cut back to where it was, so later records never follow a torn one."""
        at = os.lseek(self._log_fd, 0, os.SEEK_END)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._log_fd, view) :]
            if sync and self.sync:
                os.fdatasync(self._log_fd)
        except BaseException:
            os.ftruncate(self._log_fd, at)
            raise
        self.log_records += records

    def _maybe_compact(self) -> None:
        """Start a background compaction once the logs hold more than
        ``max(MIN_LOG_RECORDS, min(live, num_blocks / COMPACT_DIVISOR))`` records
        (the lock held, after the table has the records just appended: a table
        snapshot is taken as of the rotation)."""
        bound = max(MIN_LOG_RECORDS, min(len(self.table), self.num_blocks // COMPACT_DIVISOR))
        if self.log_records > bound and self._compactor is None:
            try:
                self._start_compaction(background=True)
            except OSError as exc:  # a full disk: retried after the next append
                self.compaction_error = exc

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _hold_back(self) -> None:
        """Wait for a running compaction only while the logs hold more than twice
        ``max(MIN_LOG_RECORDS, live)`` records (writes outrunning the snapshot),
        so the log bound holds at all times."""
        for _ in range(4):  # a compaction that keeps failing (a full disk) stops waiting
            worker = self._compactor
            if worker is threading.current_thread():
                return
            if self.log_records <= 2 * max(MIN_LOG_RECORDS, len(self.table)):
                return
            if worker is None:
                # A compaction that just ended (retiring its logs) let appends through
                # without starting the next one: start it, then wait for it.
                with self.lock:
                    if self._compactor is None:
                        try:
                            self._start_compaction(background=True)
                        except OSError as exc:
                            self.compaction_error = exc
                            return
                    worker = self._compactor
                if worker is None or worker is threading.current_thread():
                    return
            self.compaction_waits += 1
            self._wait_for(worker)

    def put(self, items: list[tuple[Key, int, int]], *, sync: bool = True) -> None:
        """Record ``(key, slot, crc)`` for blocks whose bytes are already durable."""
        if not items:
            return
        t0 = time.perf_counter()
        self._hold_back()
        keys, slots, crcs = (list(column) for column in zip(*items))
        t1 = time.perf_counter()
        with self.lock:
            t2 = time.perf_counter()
            data = encode(OP_PUT, keys, slots, crcs, self._seq + 1)
            self._append(data, len(items), sync)  # durable first, then in the table
            t3 = time.perf_counter()
            self._seq += len(items)
            self.table.apply(data, 0)
            t4 = time.perf_counter()
            self._maybe_compact()
            t5 = time.perf_counter()
        # What this update waited on compaction for: the hold-back, the lock (only a
        # compaction step or another update holds it) and a rotation it ran itself.
        waited = (t1 - t0) + (t2 - t1) + (t5 - t4)
        if waited > self.longest_compaction_wait_s:
            self.longest_compaction_wait_s = waited
        if t5 - t0 > self.slowest_put[0]:
            # (total, waiting for a compaction, for the lock, the log append, the
            # table, a rotation), in seconds: what the slowest update waited on
            self.slowest_put = (t5 - t0, t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)

    def delete(self, keys: list[Key]) -> list[Key]:
        """Remove ``keys`` (those present); returns the keys removed."""
        self._hold_back()
        with self.lock:
            frames = []
            gone = []
            for key in keys:
                seq = self._next_seq()
                if self.table.delete(key, seq):
                    frames.append(frame(OP_DEL, key, 0, 0, seq))
                    gone.append(key)
            if frames:
                self._append(b"".join(frames), len(frames), sync=False)
                self._maybe_compact()
            return gone

    def match(self, slots: list[int], keys: list[Key]) -> list[int]:
        """The checksum indexed for ``keys[i]`` at ``slots[i]``, or -1 where the slot
        holds another key or nothing."""
        with self.lock:
            got = [self.table.get(slot) for slot in slots]
        return [g[1] if g is not None and g[0] == key else -1 for g, key in zip(got, keys)]

    def entries(self) -> list[Entry]:
        """Live entries, oldest first."""
        with self.lock, gc_paused():
            items = self.table.entries()
            return [Entry(key, slot, crc) for key, slot, crc in items]

    def __len__(self) -> int:
        return len(self.table)

    # -- compaction -----------------------------------------------------------------

    def compact(self) -> None:
        """Write a snapshot of the live entries and retire the logs it covers
        (in the caller's thread; waits for a background compaction first)."""
        while True:
            self.wait_compaction()
            with self.lock:
                if self._compactor is None:  # none started since the wait: ours runs
                    self._start_compaction(background=False)
                    break
        self._write_snapshot()

    def wait_compaction(self) -> None:
        worker = self._compactor
        if worker is not None and worker is not threading.current_thread():
            self._wait_for(worker)

    def _wait_for(self, worker: threading.Thread) -> None:
        """Until the compaction ``worker`` is running (if any) has ended."""
        with self.lock:
            started = self._compactions_started
            while self._compactor is worker and self._compactions_started == started:
                self._idle.wait()

    def _start_compaction(self, *, background: bool) -> None:
        """Rotate to a new log generation (the lock held); the snapshot of
        everything before it is written by :meth:`_write_snapshot`."""
        t0 = time.perf_counter()
        try:
            self._rotate(background=background)
        finally:
            self.longest_rotation_s = max(self.longest_rotation_s, time.perf_counter() - t0)

    def _rotate(self, *, background: bool) -> None:
        if self.sync:
            os.fdatasync(self._log_fd)  # the Dels too: the next snapshot includes them
        fd = self._create_log(self.gen + 1)
        if self._compiled() is not None:
            # The table as of this instant: every chunk is written before the first
            # update that changes it (native/nvme_index.c), the rest in the background.
            snap_fd = -1
            try:
                snap_fd = os.open(self._tmp_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                layout = self._table_layout()
                self._native.snap_begin(snap_fd, layout["recs_off"], layout["ht_off"])
            except BaseException:
                if snap_fd >= 0:
                    os.close(snap_fd)
                os.close(fd)
                self._log_path(self.gen + 1).unlink(missing_ok=True)
                raise
            self._snap_fd = snap_fd
        os.close(self._log_fd)
        self._log_fd = fd
        self.gen += 1
        self._old_records = self.log_records
        if background:
            # One long-lived thread runs them: starting a thread waits until the OS
            # schedules it, which on a loaded machine can take tens of milliseconds
            # of the store that rotates (only the first compaction waits for it).
            if self._worker is None:
                self._stopping = False
                self._worker = threading.Thread(
                    target=self._work, name="kvactors-index-compaction", daemon=True
                )
                self._worker.start()
            self._compactor = self._worker
            self._wake.set()
        else:
            self._compactor = threading.current_thread()
        self._compactions_started += 1

    def _work(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            self._background()

    def _background(self) -> None:
        try:
            self._write_snapshot()
        except BaseException as exc:  # retried at the next rotation; stores go on
            self.compaction_error = exc

    def _write_snapshot(self) -> None:
        try:
            self._snapshot(self.gen)  # the new log: everything before it is in the table
        finally:
            with self.lock:
                self._compactor = None
                self._idle.notify_all()

    def close(self) -> None:
        self.wait_compaction()
        worker, self._worker = self._worker, None
        if worker is not None:
            self._stopping = True
            self._wake.set()
            worker.join()
        with self.lock:
            if self._snap_fd >= 0:  # begun, never finished (no compactor ran it)
                self._end_table_snapshot()
                self._tmp_path.unlink(missing_ok=True)
            if self._log_fd >= 0:
                os.close(self._log_fd)
                self._log_fd = -1
