"""What a manager answers: vLLM's structs, its events and statistics."""

from __future__ import annotations

import msgspec

from kvactors.keys import Key

__all__ = ["MAX_BLOCKS", "LoadStoreSpec", "ManagerStats", "OffloadingEvent", "PrepareStoreOutput"]

MAX_BLOCKS = 2**31 - 1
"""The most slots one manager holds (slot ids are 32-bit on both cores)."""


class LoadStoreSpec(msgspec.Struct, frozen=True):
    """Where blocks live in one medium: one slot id per key, in key order."""

    block_ids: list[int]
    medium: str


class PrepareStoreOutput(msgspec.Struct, frozen=True):
    """What ``prepare_store`` decided.

    ``block_hashes_to_store`` are the keys the caller must now write, into
    ``store_spec.block_ids`` (same order). ``block_hashes_evicted`` left the tier
    to make room; ``block_ids_evicted`` are the slots they occupied (already
    handed out again in ``store_spec``), so a caller that demotes victims to a
    lower tier must copy them out before writing the new blocks.
    """

    block_hashes_to_store: list[Key]
    store_spec: LoadStoreSpec
    block_hashes_evicted: list[Key]
    block_ids_evicted: list[int] = []


class OffloadingEvent(msgspec.Struct, frozen=True):
    """Blocks that became ready (``removed=False``) or left the tier (``removed=True``)."""

    block_hashes: list[Key]
    block_size: int
    medium: str
    removed: bool


class ManagerStats(msgspec.Struct, frozen=True):
    """A snapshot of one tier's metadata. ``hits / lookup_keys`` is the key hit ratio."""

    medium: str
    policy: str
    capacity: int
    used: int
    free: int
    pinned: int
    being_written: int
    lookups: int
    lookup_keys: int
    hits: int
    stores: int
    evictions: int
    failed_prepares: int
