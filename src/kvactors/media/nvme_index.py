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

Compaction starts when the logs hold more records than ``max(MIN_LOG_RECORDS,
live entries)``: under the lock it only rotates to a new log generation; a
background thread then copies the table a chunk of slots at a time (the lock
held for one chunk), writes ``index.snap.tmp``, fsyncs it, renames it over
``index.snap``, fsyncs the directory and only then deletes the older logs. A
crash at any point reopens from the previous snapshot and every log after it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeAlias

import msgspec

from kvactors.errors import ConfigError, IndexDamagedError
from kvactors.keys import Key

if TYPE_CHECKING:
    from kvactors._nvme_index import Table as _NativeTableType

try:
    from kvactors._nvme_index import Table as _NativeTable
    from kvactors._nvme_index import encode as _native_encode
except ImportError:  # built without a C compiler: the Python reference table
    _NativeTable = None  # type: ignore[misc,assignment]
    _native_encode = None  # type: ignore[assignment]

__all__ = ["MIN_LOG_RECORDS", "Entry", "NVMeIndex", "checksum"]

VERSION = 2  # of index.meta, the logs and the record-format snapshot
TABLE_VERSION = 3  # of the snapshot that is the compiled table's own arrays
MIN_LOG_RECORDS = 1024
# Compaction starts past max(MIN_LOG_RECORDS, min(live, num_blocks / COMPACT_DIVISOR))
# log records: a reopen replays at most about num_blocks / 16 records after reading
# the snapshot, and a snapshot (at most the table's size) is written once per that
# many records at most.
COMPACT_DIVISOR = 16
CHUNK_SLOTS = 1 << 14  # slots copied per lock hold while a record snapshot is written
SNAP_CHUNKS = 256  # chunks with long keys (4-6 KiB each) copied per lock hold
SNAP_COPY_HOLD_US = 0  # tests: a pause inside each chunk's copy (see Table.snap_copy)
READ_BYTES = 16 << 20  # index files are read and applied this many bytes at a time
# How a table snapshot is read: "read" (into fresh anonymous memory), "direct" (the
# same with O_DIRECT, falling back to "read" where the file system refuses it) or
# "mmap" (MAP_PRIVATE | MAP_POPULATE of the file itself).
SNAP_LOAD = "direct"
_LOAD_HOW = {"read": 0, "direct": 1, "mmap": 2}
PAGE = 4096

_REC = struct.Struct("<IBBHIIQ")  # crc, op, kind, key length, slot, block crc, seq
_META = struct.Struct("<8sIIQQII")  # magic, version, stripes, block_bytes, num_blocks, 0, crc
_SNAP = struct.Struct("<8sIIQQQQII")  # magic, version, stripes, gen, count, bb, nb, 0, crc
_LOG = struct.Struct("<8sIIQI4x")  # magic, version, 0, gen, crc
# The table snapshot's header (one page): magic, version, stripes, gen, block_bytes,
# num_blocks, live, max_seq, seed, buckets, rec_bytes, slot_bits, rec_chunk,
# ht_chunk, chunks, crcs_crc, crcs_off, recs_off, ht_off, long_off, long_len,
# long_count, long_crc, dist_max (the most a bucket's distance field holds), crc
_TSNAP = struct.Struct("<8sIIQQQQQQQIIIIIIQQQQQQIII")
META_MAGIC, SNAP_MAGIC, LOG_MAGIC = b"KVAMETA2", b"KVASNAP2", b"KVALOG02"
TSNAP_MAGIC = b"KVATBL03"
OP_PUT, OP_DEL = 1, 2
KIND_INT, KIND_BYTES, KIND_BIGINT = 0, 1, 2
_I64 = 1 << 63
Buffer: TypeAlias = bytes | bytearray | memoryview


def checksum(data: memoryview | bytes) -> int:
    """CRC-32 of one block's bytes."""
    return zlib.crc32(data)


class Entry(msgspec.Struct, frozen=True, gc=False):
    key: Key
    slot: int
    crc: int


def encode_key(key: Key) -> tuple[int, bytes]:
    """``(kind, raw bytes)`` of a key as records store it."""
    if isinstance(key, bytes):
        return KIND_BYTES, bytes(key)
    if -_I64 <= key < _I64:
        return KIND_INT, key.to_bytes(8, "little", signed=True)
    return KIND_BIGINT, key.to_bytes((key.bit_length() + 8) // 8, "little", signed=True)


def decode_key(kind: int, raw: bytes) -> Key:
    return raw if kind == KIND_BYTES else int.from_bytes(raw, "little", signed=True)


def encode(op: int, keys: list[Key], slots: list[int], crcs: list[int], first_seq: int) -> bytes:
    """Records of ``keys`` numbered from ``first_seq`` (compiled where built)."""
    if _native_encode is not None:
        return _native_encode(op, keys, slots, crcs, first_seq)
    return b"".join(
        frame(op, key, slot, crc, first_seq + i)
        for i, (key, slot, crc) in enumerate(zip(keys, slots, crcs))
    )


def frame(op: int, key: Key, slot: int, crc: int, seq: int) -> bytes:
    """One record, framed and padded."""
    kind, raw = encode_key(key)
    body = _REC.pack(0, op, kind, len(raw), slot, crc, seq)[4:] + raw
    body += bytes(-(len(body) + 4) % 8)
    return struct.pack("<I", zlib.crc32(body)) + body


class _Table(Protocol):
    """The live entries; the compiled ``Table`` and :class:`_PyTable` both follow it."""

    def put(self, key: Key, slot: int, crc: int, seq: int) -> None: ...
    def delete(self, key: Key, seq: int) -> bool: ...
    def get(self, slot: int) -> tuple[Key, int] | None: ...
    def find(self, key: Key) -> int: ...
    def apply(self, data: Buffer, offset: int) -> tuple[int, int, int]: ...
    def dump(self, lo: int, hi: int) -> tuple[bytes, int]: ...
    def entries(self) -> list[tuple[Key, int, int]]: ...
    def __len__(self) -> int: ...
    @property
    def max_seq(self) -> int: ...
    @property
    def nbytes(self) -> int: ...


class _PyTable:
    """The reference table: dicts keyed by slot and key (one object per entry)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.by_slot: dict[int, tuple[Key, int, int]] = {}  # slot -> (key, crc, seq)
        self.by_key: dict[Key, int] = {}
        self.max_seq = 0

    def __len__(self) -> int:
        return len(self.by_key)

    @property
    def nbytes(self) -> int:
        return 0  # not measured: Python objects

    def put(self, key: Key, slot: int, crc: int, seq: int) -> None:
        self.max_seq = max(self.max_seq, seq)
        if not 0 <= slot < self.num_blocks:
            return
        old = self.by_key.get(key)
        if old is not None and self.by_slot[old][2] >= seq:
            return  # the key was written again later (or this very record again)
        here = self.by_slot.get(slot)
        if here is not None and here[2] >= seq:
            return  # the slot was reused later
        if old is not None:
            del self.by_slot[old]
            here = self.by_slot.get(slot)
        if here is not None:
            del self.by_key[here[0]]  # the slot was reused: its earlier key is gone
        self.by_slot[slot] = (key, crc, seq)
        self.by_key[key] = slot

    def delete(self, key: Key, seq: int) -> bool:
        self.max_seq = max(self.max_seq, seq)
        slot = self.by_key.get(key)
        if slot is None or self.by_slot[slot][2] > seq:
            return False
        del self.by_key[key]
        del self.by_slot[slot]
        return True

    def get(self, slot: int) -> tuple[Key, int] | None:
        entry = self.by_slot.get(slot)
        return None if entry is None else (entry[0], entry[1])

    def find(self, key: Key) -> int:
        return self.by_key.get(key, -1)

    def apply(self, data: Buffer, offset: int) -> tuple[int, int, int]:
        """Apply the records of ``data`` from ``offset``; ``(applied, end, ok)``:
        ``end`` is where the records applied end, ``ok`` is 1 when that is the end
        of ``data``, 0 when a bad record starts there, 2 when ``data`` ends in the
        middle of the record that starts there."""
        n = 0
        size = len(data)
        while offset < size:
            if offset + _REC.size > size:
                return n, offset, 2
            crc, op, kind, klen, slot, bcrc, seq = _REC.unpack_from(data, offset)
            total = _REC.size + klen + (-(_REC.size + klen) % 8)
            if offset + total > size:
                return n, offset, 2
            if zlib.crc32(data[offset + 4 : offset + total]) != crc:
                return n, offset, 0
            if op not in (OP_PUT, OP_DEL) or kind > KIND_BIGINT:
                return n, offset, 0
            raw = bytes(data[offset + _REC.size : offset + _REC.size + klen])
            key = decode_key(kind, raw)
            if op == OP_PUT:
                self.put(key, slot, bcrc, seq)
            else:
                self.delete(key, seq)
            n += 1
            offset += total
        return n, offset, 1

    def dump(self, lo: int, hi: int) -> tuple[bytes, int]:
        parts = [
            frame(OP_PUT, e[0], slot, e[1], e[2])
            for slot in range(lo, min(hi, self.num_blocks))
            if (e := self.by_slot.get(slot)) is not None
        ]
        return b"".join(parts), len(parts)

    def entries(self) -> list[tuple[Key, int, int]]:
        items = sorted(self.by_slot.items(), key=lambda item: item[1][2])
        return [(key, slot, crc) for slot, (key, crc, _) in items]


def new_table(num_blocks: int, native: bool | None = None) -> _Table:
    """The compiled table where built (``native=None``), else the Python one."""
    if native is None:
        native = _NativeTable is not None
    if native:
        if _NativeTable is None:
            raise ConfigError("the compiled NVMe index (kvactors._nvme_index) is not built")
        seed = int.from_bytes(os.urandom(8), "little")  # the hash layout is per directory
        table: _Table = _NativeTable(num_blocks, seed)
        return table
    return _PyTable(num_blocks)


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


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _round_page(n: int) -> int:
    return -(-n // PAGE) * PAGE


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _read_file(path: Path) -> bytes:
    """A small file's bytes; a directory in its place is a damaged directory."""
    if path.is_dir():
        raise IndexDamagedError(f"{path} is a directory, not an index file; move it away")
    return path.read_bytes()


def _head(path: Path, size: int) -> bytes:
    """The first ``size`` bytes of an index file (fewer if it is shorter)."""
    if path.is_dir():
        raise IndexDamagedError(f"{path} is a directory, not an index file; move it away")
    with open(path, "rb") as fh:
        return fh.read(size)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Bulk creation of millions of small objects without a collection every 700."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class NVMeIndex:
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
    ) -> None:
        self.directory = directory
        self.block_bytes = block_bytes
        self.num_blocks = num_blocks
        self.stripes = stripes
        self.sync = sync
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
        self._check_meta(data_files or [])
        self.gen = self._load()
        self._seq = self.table.max_seq
        self._open_log()
        if self.quarantined or self.torn_tail:
            self.compact()  # what verified, durable on its own again

    # -- geometry -------------------------------------------------------------------

    def _meta_bytes(self) -> bytes:
        head = _META.pack(
            META_MAGIC, VERSION, self.stripes, self.block_bytes, self.num_blocks, 0, 0
        )
        return head[:-4] + struct.pack("<I", zlib.crc32(head[:-4]))

    def _check_meta(self, data_files: list[Path]) -> None:
        path = self.meta_path
        if not path.exists() and not path.is_symlink():
            others = [p for p in data_files if p.exists()]
            if others or self.snap_path.exists() or list(self.directory.glob("index.*.log")):
                found = others[0] if others else self.snap_path
                raise IndexDamagedError(
                    f"{path} is missing but {found.name} exists: the directory's geometry "
                    "(block_bytes, num_blocks, stripes) is unknown, so it is not reopened; "
                    "move the directory away or restore the file"
                )
            _write_atomic(path, self._meta_bytes())
            return
        data = _read_file(path)
        if len(data) != _META.size or zlib.crc32(data[:-4]) != _META.unpack(data)[-1]:
            raise IndexDamagedError(
                f"{path} is damaged (not a kvactors geometry record): the directory's "
                "block_bytes / num_blocks / stripes are unknown, so it is not reopened"
            )
        magic, version, stripes, bb, nb, _, _ = _META.unpack(data)
        if magic != META_MAGIC or version != VERSION:
            raise IndexDamagedError(f"{path}: index version {version} is not supported")
        if (bb, nb) != (self.block_bytes, self.num_blocks):
            raise ConfigError(
                f"nvme.directory: holds blocks of {bb} bytes x {nb}, "
                f"config asks for {self.block_bytes} x {self.num_blocks}"
            )
        if stripes != self.stripes:
            raise ConfigError(
                f"nvme.directory: its blocks are spread over {stripes} file(s), "
                f"config asks for nvme.stripes = {self.stripes}"
            )

    # -- recovery -------------------------------------------------------------------

    def _log_path(self, gen: int) -> Path:
        return self.directory / f"index.{gen}.log"

    def _logs(self) -> list[int]:
        gens = []
        for path in self.directory.glob("index.*.log"):
            middle = path.name[len("index.") : -len(".log")]
            if middle.isdigit():
                gens.append(int(middle))
        return sorted(gens)

    def _quarantine(self, path: Path) -> None:
        n = 0
        while (target := path.with_name(f"{path.name}.damaged{n or ''}")).exists():
            n += 1
        os.replace(path, target)
        self.quarantined.append(target)

    def _load(self) -> int:
        """Snapshot, then every log from its generation on; the newest generation."""
        for stale in self.directory.glob("index.*.tmp"):
            stale.unlink()  # a crash while writing it: never renamed, never used
        covered = 0
        t0 = time.perf_counter()
        if self.snap_path.exists() or self.snap_path.is_symlink():
            covered = self._load_snapshot()
            if covered < 0:
                # Keep the entries that verified (each record has its own CRC),
                # set the file aside and replay every log there is.
                self._quarantine(self.snap_path)
                covered = 0
        gens = self._logs()
        for gen in gens:
            if gen < covered:
                self._log_path(gen).unlink()  # retired by the snapshot
        gens = [g for g in gens if g >= covered]
        t1 = time.perf_counter()
        for i, gen in enumerate(gens):
            self._replay(gen, last=i == len(gens) - 1)
        self.load_seconds = (t1 - t0, time.perf_counter() - t1)
        return max([covered, *self._logs()], default=0) or 1

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
        data = _head(self.snap_path, PAGE)
        if data[:8] == TSNAP_MAGIC:
            return self._load_table_snapshot(data)
        if len(data) < _SNAP.size:
            return -1
        magic, version, stripes, gen, count, bb, nb, _, crc = _SNAP.unpack_from(data)
        if magic != SNAP_MAGIC or zlib.crc32(data[: _SNAP.size - 4]) != crc:
            return -1
        if version != VERSION:
            raise IndexDamagedError(f"{self.snap_path}: version {version} not supported")
        self._check_geometry(bb, nb, stripes)
        applied, _, intact = self._apply_file(self.snap_path, _SNAP.size)
        self.snapshot_format = VERSION
        return gen if intact and applied == count else -1

    def _check_geometry(self, bb: int, nb: int, stripes: int) -> None:
        if (bb, nb, stripes) != (self.block_bytes, self.num_blocks, self.stripes):
            raise IndexDamagedError(
                f"{self.snap_path} describes {bb} x {nb} blocks over {stripes} "
                f"file(s), {self.meta_path.name} {self.block_bytes} x "
                f"{self.num_blocks} over {self.stripes}"
            )

    def _compiled(self) -> _NativeTableType | None:
        table = self.table
        if _NativeTable is not None and isinstance(table, _NativeTable):
            return table
        return None

    @property
    def _native(self) -> _NativeTableType:
        table = self._compiled()
        assert table is not None, "the compiled table's own snapshot needs the compiled table"
        return table

    def _table_layout(self) -> dict[str, int]:
        """Where a table snapshot puts each part (page-aligned, in this order): the
        header page, the chunks' CRC-32Cs, the record array, the bucket array, the
        keys of more than 32 bytes."""
        layout: dict[str, int] = dict(self._native.layout)
        crcs_off = PAGE
        recs_off = crcs_off + _round_page(4 * layout["chunks"])
        ht_off = recs_off + _round_page(layout["recs_bytes"])
        long_off = ht_off + _round_page(layout["ht_bytes"])
        layout.update(crcs_off=crcs_off, recs_off=recs_off, ht_off=ht_off, long_off=long_off)
        return layout

    def _load_table_snapshot(self, head: bytes) -> int:
        """The compiled table's own arrays, read straight into it (docs/durability.md)."""
        if len(head) < _TSNAP.size or zlib.crc32(head[: _TSNAP.size - 4]) != int.from_bytes(
            head[_TSNAP.size - 4 : _TSNAP.size], "little"
        ):
            return -1  # a torn or garbage header: nothing in the file can be trusted
        (
            _, version, stripes, gen, bb, nb, live, max_seq, seed, buckets, rec_bytes,
            slot_bits, rec_chunk, ht_chunk, chunks, crcs_crc, crcs_off, recs_off, ht_off,
            long_off, long_len, long_count, long_crc, dist_max, _,
        ) = _TSNAP.unpack_from(head)  # fmt: skip
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
            how = _LOAD_HOW[SNAP_LOAD]
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

    def _replay(self, gen: int, *, last: bool) -> None:
        path = self._log_path(gen)
        head = _LOG.size
        data = _head(path, head)
        if len(data) < head:
            # Created but its header never reached the disk: nothing was in it.
            if data.strip(b"\0") and not last:
                self._quarantine(path)
            else:
                path.unlink()
                self.torn_tail = self.torn_tail or bool(data)
            return
        magic, version, _, got_gen, crc = _LOG.unpack_from(data)
        bad_head = magic != LOG_MAGIC or version != VERSION or got_gen != gen
        if bad_head or zlib.crc32(data[: head - 8]) != crc:
            self._quarantine(path)
            return
        applied, end, intact = self._apply_file(path, head)
        self.log_records += applied
        if not intact:
            # A torn append (or damage): cut the log there so new records follow good ones.
            self.torn_tail = True
            with open(path, "r+b") as fh:
                fh.truncate(end)
                os.fsync(fh.fileno())

    # -- the log --------------------------------------------------------------------

    def _log_header(self, gen: int) -> bytes:
        head = _LOG.pack(LOG_MAGIC, VERSION, 0, gen, 0)
        return (
            head[: _LOG.size - 8] + struct.pack("<I", zlib.crc32(head[: _LOG.size - 8])) + bytes(4)
        )

    def _open_log(self) -> None:
        self._log_fd = self._create_log(self.gen)

    def _create_log(self, gen: int) -> int:
        """The descriptor of log ``gen``, its header durable (created if new)."""
        path = self._log_path(gen)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            if os.fstat(fd).st_size == 0:
                os.write(fd, self._log_header(gen))
                if self.sync:
                    os.fsync(fd)
                    _fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return fd

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

    def lookup_slot(self, slot: int) -> Entry | None:
        with self.lock:
            got = self.table.get(slot)
        return None if got is None else Entry(got[0], slot, got[1])

    def match(self, slots: list[int], keys: list[Key]) -> list[int]:
        """The checksum indexed for ``keys[i]`` at ``slots[i]``, or -1 where the slot
        holds another key or nothing."""
        with self.lock:
            got = [self.table.get(slot) for slot in slots]
        return [g[1] if g is not None and g[0] == key else -1 for g, key in zip(got, keys)]

    def entries(self) -> list[Entry]:
        """Live entries, oldest first."""
        with self.lock, _gc_paused():
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
            _pwrite_all(fd, crcs, layout["crcs_off"])
            if longs:
                _pwrite_all(fd, longs, layout["long_off"])
            head = _TSNAP.pack(
                TSNAP_MAGIC, TABLE_VERSION, self.stripes, gen, self.block_bytes,
                self.num_blocks, live, max_seq, self._native.seed,
                layout["buckets"], layout["rec_bytes"], layout["slot_bits"],
                layout["rec_chunk"], layout["ht_chunk"], layout["chunks"], zlib.crc32(crcs),
                layout["crcs_off"], layout["recs_off"], layout["ht_off"], layout["long_off"],
                len(longs), long_count, zlib.crc32(longs), layout["dist_max"], 0,
            )[:-4]  # fmt: skip
            _pwrite_all(fd, head + struct.pack("<I", zlib.crc32(head)), 0)
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
            _fsync_dir(self.directory)
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
            os.write(fd, bytes(_SNAP.size))
            for lo in range(0, self.num_blocks, CHUNK_SLOTS):
                with self.lock:
                    data, n = self.table.dump(lo, lo + CHUNK_SLOTS)
                if data:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                count += n
            head = _SNAP.pack(
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
