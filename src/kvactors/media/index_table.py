"""The NVMe index's live table: key -> (slot, checksum, sequence), compact.

With the compiled core (``kvactors._nvme_index``) a fixed 48-byte record per slot
(keys of up to 32 bytes inline) plus a 4-byte open-addressing hash of keys, no
Python object per block; without it, :class:`PyTable`, a Python reference table
of dicts that behaves the same. Both follow :class:`IndexTable`.
"""

from __future__ import annotations

import os
import zlib
from typing import Protocol

from kvactors.errors import ConfigError
from kvactors.keys import Key
from kvactors.media.index_format import (
    KIND_BIGINT,
    OP_DEL,
    OP_PUT,
    RECORD,
    Buffer,
    decode_key,
    frame,
)

try:
    from kvactors._nvme_index import Table as NativeTable
except ImportError:  # built without a C compiler: the Python reference table
    NativeTable = None  # type: ignore[misc,assignment]

__all__ = ["IndexTable", "NativeTable", "PyTable", "new_table"]


class IndexTable(Protocol):
    """The live entries; the compiled ``Table`` and :class:`PyTable` both follow it."""

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


class PyTable:
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
            if offset + RECORD.size > size:
                return n, offset, 2
            crc, op, kind, klen, slot, bcrc, seq = RECORD.unpack_from(data, offset)
            total = RECORD.size + klen + (-(RECORD.size + klen) % 8)
            if offset + total > size:
                return n, offset, 2
            if zlib.crc32(data[offset + 4 : offset + total]) != crc:
                return n, offset, 0
            if op not in (OP_PUT, OP_DEL) or kind > KIND_BIGINT:
                return n, offset, 0
            raw = bytes(data[offset + RECORD.size : offset + RECORD.size + klen])
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


def new_table(num_blocks: int, native: bool | None = None) -> IndexTable:
    """The compiled table where built (``native=None``), else the Python one."""
    if native is None:
        native = NativeTable is not None
    if native:
        if NativeTable is None:
            raise ConfigError("the compiled NVMe index (kvactors._nvme_index) is not built")
        seed = int.from_bytes(os.urandom(8), "little")  # the hash layout is per directory
        table: IndexTable = NativeTable(num_blocks, seed)
        return table
    return PyTable(num_blocks)
