"""The NVMe tier's on-disk index: which key is in which slot, with its checksum.

Two files under the cache directory, both written with msgspec:

- ``index.snap``: a snapshot of every live entry, replaced atomically
  (write ``index.snap.tmp``, fsync, rename, fsync the directory);
- ``index.log``: records appended since the snapshot, each framed as
  ``u32 length | u32 crc32(payload) | payload``. A torn or corrupt tail (a crash
  in the middle of an append) ends the replay there and is cut off.

Crash safety, and where fsync matters:

- block bytes are fsynced *before* the ``Put`` records naming them are
  appended, and the log is fsynced before a write job reports success: a block
  reported stored survives a crash at any later instant;
- evictions write nothing: the slot's next ``Put`` supersedes the old key. A
  crash between the new bytes and the new record leaves the old record pointing
  at new bytes; its checksum no longer matches, so the block is a miss when read,
  never data;
- ``Del`` records (integrity failures, explicit drops) are appended without
  fsync: losing one only brings back a record whose checksum check fails again.

Compaction rewrites the snapshot when the log holds more than
``max(1024, 2 x live entries)`` records.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import msgspec

from kvactors.errors import ConfigError
from kvactors.keys import Key

__all__ = ["Entry", "NVMeIndex", "checksum"]

_FRAME = struct.Struct("<II")
_VERSION = 1


def checksum(data: memoryview | bytes) -> int:
    """CRC-32 of one block's bytes."""
    return zlib.crc32(data)


def _encode_key(key: Key) -> tuple[int, bytes]:
    if type(key) is bytes:
        return 1, key
    assert isinstance(key, int)
    return 0, key.to_bytes((key.bit_length() + 8) // 8, "little", signed=True)


def _decode_key(kind: int, raw: bytes) -> Key:
    return raw if kind == 1 else int.from_bytes(raw, "little", signed=True)


class Meta(msgspec.Struct, array_like=True, tag=0):
    version: int
    block_bytes: int
    num_blocks: int
    stripes: int = 1  # files the slots are spread over (absent in older logs: one)


class Put(msgspec.Struct, array_like=True, tag=1):
    kind: int
    key: bytes
    slot: int
    crc: int


class Del(msgspec.Struct, array_like=True, tag=2):
    kind: int
    key: bytes


Record = Meta | Put | Del


class Snapshot(msgspec.Struct):
    meta: Meta
    entries: list[Put]


class Entry(msgspec.Struct, frozen=True):
    key: Key
    slot: int
    crc: int


class NVMeIndex:
    """Key -> (slot, checksum) for one cache directory; see the module docstring.

    Not thread-safe: the NVMe store calls it from one job at a time per slot set
    and serialises index updates itself.
    """

    def __init__(
        self, directory: Path, block_bytes: int, num_blocks: int, stripes: int = 1
    ) -> None:
        self.directory = directory
        self.block_bytes = block_bytes
        self.num_blocks = num_blocks
        self.stripes = stripes
        self.snap_path = directory / "index.snap"
        self.log_path = directory / "index.log"
        self.by_slot: dict[int, Entry] = {}
        self.by_key: dict[Key, Entry] = {}
        self.order: dict[Key, None] = {}  # recovery order, oldest first
        self.log_records = 0
        self.torn_tail = False
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(Record)
        self._load()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the index

    def _meta(self) -> Meta:
        return Meta(_VERSION, self.block_bytes, self.num_blocks, self.stripes)

    # -- recovery -------------------------------------------------------------------

    def _check_meta(self, meta: Meta) -> None:
        if meta.version != _VERSION:
            raise ConfigError(f"nvme.directory: index version {meta.version} is not supported")
        if (meta.block_bytes, meta.num_blocks) != (self.block_bytes, self.num_blocks):
            raise ConfigError(
                f"nvme.directory: holds blocks of {meta.block_bytes} bytes x {meta.num_blocks}, "
                f"config asks for {self.block_bytes} x {self.num_blocks}"
            )
        if meta.stripes != self.stripes:
            raise ConfigError(
                f"nvme.directory: its blocks are spread over {meta.stripes} file(s), "
                f"config asks for nvme.stripes = {self.stripes}"
            )

    def _load(self) -> None:
        if self.snap_path.exists():
            snap = msgspec.msgpack.decode(self.snap_path.read_bytes(), type=Snapshot)
            self._check_meta(snap.meta)
            for put in snap.entries:
                self._apply(put)
        if not self.log_path.exists():
            with open(self.log_path, "wb") as fh:
                fh.write(self._frame(self._meta()))
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(self.directory)
            return
        data = self.log_path.read_bytes()
        off = 0
        good = 0
        while off + _FRAME.size <= len(data):
            length, crc = _FRAME.unpack_from(data, off)
            payload = data[off + _FRAME.size : off + _FRAME.size + length]
            if len(payload) != length or zlib.crc32(payload) != crc:
                break
            try:
                record = self._dec.decode(payload)
            except msgspec.DecodeError:
                break
            if isinstance(record, Meta):
                self._check_meta(record)
            else:
                self._apply(record)
            self.log_records += 1
            off += _FRAME.size + length
            good = off
        if good != len(data):
            # A torn append: cut it off so new records follow good ones.
            self.torn_tail = True
            with open(self.log_path, "r+b") as fh:
                fh.truncate(good)
                os.fsync(fh.fileno())

    def _apply(self, record: Put | Del) -> None:
        key = _decode_key(record.kind, record.key)
        old = self.by_key.pop(key, None)
        if old is not None:
            self.by_slot.pop(old.slot, None)
            self.order.pop(key, None)
        if isinstance(record, Put):
            if not 0 <= record.slot < self.num_blocks:
                return
            prev = self.by_slot.get(record.slot)
            if prev is not None:
                # The slot was reused: its earlier key is gone.
                self.by_key.pop(prev.key, None)
                self.order.pop(prev.key, None)
            entry = Entry(key, record.slot, record.crc)
            self.by_slot[record.slot] = entry
            self.by_key[key] = entry
            self.order[key] = None

    def entries(self) -> list[Entry]:
        """Live entries, oldest first."""
        return [self.by_key[k] for k in self.order]

    # -- updates --------------------------------------------------------------------

    def _frame(self, record: Record) -> bytes:
        payload = self._enc.encode(record)
        return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload

    def put(self, items: list[tuple[Key, int, int]], *, sync: bool = True) -> None:
        """Record ``(key, slot, crc)`` for blocks whose bytes are already durable."""
        frames = []
        for key, slot, crc in items:
            kind, raw = _encode_key(key)
            record = Put(kind, raw, slot, crc)
            self._apply(record)
            frames.append(self._frame(record))
        self._append(b"".join(frames), sync)

    def delete(self, keys: list[Key]) -> None:
        frames = []
        for key in keys:
            kind, raw = _encode_key(key)
            record = Del(kind, raw)
            self._apply(record)
            frames.append(self._frame(record))
        self._append(b"".join(frames), sync=False)

    def _append(self, data: bytes, sync: bool) -> None:
        if not data:
            return
        self._log.write(data)
        self._log.flush()
        if sync:
            os.fdatasync(self._log.fileno())
        self.log_records += 1
        if self.log_records > max(1024, 2 * len(self.by_key)):
            self.compact()

    def lookup_slot(self, slot: int) -> Entry | None:
        return self.by_slot.get(slot)

    def compact(self) -> None:
        """Write a snapshot of the live entries and start an empty log."""
        entries = [
            Put(*_encode_key(e.key), e.slot, e.crc) for e in (self.by_key[k] for k in self.order)
        ]
        snap = Snapshot(self._meta(), entries)
        tmp = self.snap_path.with_suffix(".snap.tmp")
        with open(tmp, "wb") as fh:
            fh.write(msgspec.msgpack.encode(snap))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.snap_path)
        _fsync_dir(self.directory)
        # A crash from here until the truncate replays the old log over the new
        # snapshot: the same records again, so the same state.
        self._log.close()
        with open(self.log_path, "wb") as fh:
            fh.write(self._frame(self._meta()))
            fh.flush()
            os.fsync(fh.fileno())
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.log_records = 1

    def close(self) -> None:
        if not self._log.closed:
            self._log.close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
