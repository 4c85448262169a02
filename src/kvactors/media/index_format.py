"""The NVMe index's file formats: record framing, headers, and small-file I/O.

The layout of each file (``index.meta``, ``index.snap``, ``index.G.log``) and why
it is crash safe are described in :mod:`kvactors.media.nvme_index`; this module
holds the bytes of it: the record frame, the header structs and the helpers that
write and read small index files durably.
"""

from __future__ import annotations

import contextlib
import gc
import os
import stat
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TypeAlias

import msgspec

from kvactors.errors import IndexDamagedError
from kvactors.keys import Key

try:
    from kvactors._nvme_index import encode as _native_encode
except ImportError:  # built without a C compiler: records framed in Python
    _native_encode = None  # type: ignore[assignment]

__all__ = [
    "LOG_HEAD",
    "LOG_MAGIC",
    "META",
    "META_MAGIC",
    "OP_DEL",
    "OP_PUT",
    "PAGE",
    "RECORD",
    "SNAP_HEAD",
    "SNAP_MAGIC",
    "TABLE_HEAD",
    "TABLE_VERSION",
    "TSNAP_MAGIC",
    "VERSION",
    "Buffer",
    "Entry",
    "check_regular",
    "checksum",
    "decode_key",
    "encode",
    "encode_key",
    "frame",
    "fsync_dir",
    "gc_paused",
    "pwrite_all",
    "read_file",
    "read_head",
    "round_page",
    "write_atomic",
]

VERSION = 2  # of index.meta, the logs and the record-format snapshot
TABLE_VERSION = 3  # of the snapshot that is the compiled table's own arrays
PAGE = 4096

RECORD = struct.Struct("<IBBHIIQ")  # crc, op, kind, key length, slot, block crc, seq
META = struct.Struct("<8sIIQQII")  # magic, version, stripes, block_bytes, num_blocks, 0, crc
SNAP_HEAD = struct.Struct("<8sIIQQQQII")  # magic, version, stripes, gen, count, bb, nb, 0, crc
LOG_HEAD = struct.Struct("<8sIIQI4x")  # magic, version, 0, gen, crc
# The table snapshot's header (one page): magic, version, stripes, gen, block_bytes,
# num_blocks, live, max_seq, seed, buckets, rec_bytes, slot_bits, rec_chunk,
# ht_chunk, chunks, crcs_crc, crcs_off, recs_off, ht_off, long_off, long_len,
# long_count, long_crc, dist_max (the most a bucket's distance field holds), crc
TABLE_HEAD = struct.Struct("<8sIIQQQQQQQIIIIIIQQQQQQIII")
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


MAX_KEY_BYTES = 65_535
"""The longest key a record holds (its length is a ``u16``): a ``bytes`` key's
length, an ``int`` key's signed little-endian bytes."""
_MAX_INT_BITS = 8 * MAX_KEY_BYTES  # an int of this many bits needs one byte more


def _too_long(keys: list[Key]) -> bool:
    """Whether a key is longer than :data:`MAX_KEY_BYTES`: one C loop over a list of
    ints or of bytes, a Python one over a mixed list."""
    try:
        return max(map(int.bit_length, keys)) >= _MAX_INT_BITS  # type: ignore[arg-type]
    except TypeError:
        pass
    try:
        return max(map(len, keys)) > MAX_KEY_BYTES  # type: ignore[arg-type]
    except TypeError:
        return any(
            len(key) > MAX_KEY_BYTES
            if isinstance(key, bytes)
            else key.bit_length() >= _MAX_INT_BITS
            for key in keys
        )


def fitting(keys: list[Key]) -> list[Key]:
    """``keys`` less those longer than :data:`MAX_KEY_BYTES` (``keys`` itself when
    every one fits, found in one C loop as :func:`encode` finds it)."""
    if not keys or not _too_long(keys):
        return keys
    return [key for key in keys if not _too_long([key])]


def encode(op: int, keys: list[Key], slots: list[int], crcs: list[int], first_seq: int) -> bytes:
    """Records of ``keys`` numbered from ``first_seq`` (compiled where built).

    A key longer than :data:`MAX_KEY_BYTES` (``bytes``, or an ``int`` whose
    bytes are) raises ``ValueError``: nothing is encoded."""
    if keys and _too_long(keys):
        raise ValueError(f"keys of the NVMe index are at most {MAX_KEY_BYTES} bytes")
    if _native_encode is not None:
        return _native_encode(op, keys, slots, crcs, first_seq)
    return b"".join(
        frame(op, key, slot, crc, first_seq + i)
        for i, (key, slot, crc) in enumerate(zip(keys, slots, crcs))
    )


def frame(op: int, key: Key, slot: int, crc: int, seq: int) -> bytes:
    """One record, framed and padded."""
    kind, raw = encode_key(key)
    body = RECORD.pack(0, op, kind, len(raw), slot, crc, seq)[4:] + raw
    body += bytes(-(len(body) + 4) % 8)
    return struct.pack("<I", zlib.crc32(body)) + body


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def round_page(n: int) -> int:
    return -(-n // PAGE) * PAGE


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, sync: bool = True) -> None:
    """``data`` as ``path``, whole or not at all: a temporary file renamed over it,
    fsynced before and (the directory) after unless ``sync`` is false (a
    temporary directory, which cannot outlive the process)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync:
        fsync_dir(path.parent)


def check_regular(path: Path, what: str = "an index file") -> None:
    """Anything but a regular file where one of the directory's files should be
    (a directory, a FIFO, a socket, a device) is a damaged directory: reading a
    FIFO would wait for a writer forever. An absent path passes."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        raise IndexDamagedError(f"{path} is a directory, not {what}; move it away")
    if not stat.S_ISREG(mode):
        raise IndexDamagedError(f"{path} is not a regular file, not {what}; move it away")


def read_file(path: Path) -> bytes:
    """A small file's bytes; anything but a regular file in its place is a
    damaged directory."""
    check_regular(path)
    return path.read_bytes()


def read_head(path: Path, size: int) -> bytes:
    """The first ``size`` bytes of an index file (fewer if it is shorter)."""
    check_regular(path)
    with open(path, "rb") as fh:
        return fh.read(size)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Bulk creation of millions of small objects without a collection every 700."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
