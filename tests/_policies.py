"""A user's own ``CachePolicy`` for the manager tests: first in, first out,
ignoring touches, recording every call its manager makes (so the two cores can
be held to the same calls, and to what docs/policies.md says they are)."""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator, Sequence
from typing import ClassVar

from kvactors.keys import Key
from kvactors.policy import BlockStatus


class RecordingFIFO:
    """FIFO order; ``calls`` holds each call as a tuple: ``("insert", key, block_id,
    ref_cnt, size)``, ``("insert_many", [(key, block_id, ref_cnt, size), ...])``,
    ``("remove", key)``, ``("touch", keys)`` and ``("evict", n, idle keys not
    protected, held keys protected)``, the last two sorted by ``repr``."""

    name: ClassVar[str] = "recording_fifo"

    def __init__(self) -> None:
        self.blocks: dict[Key, BlockStatus] = {}
        self.calls: list[tuple[object, ...]] = []

    def get(self, key: Key) -> BlockStatus | None:
        return self.blocks.get(key)

    def insert(self, key: Key, block: BlockStatus) -> None:
        self.calls.append(("insert", key, block.block_id, block.ref_cnt, block.size))
        self.blocks[key] = block

    def insert_many(self, items: Iterable[tuple[Key, BlockStatus]]) -> None:
        items = list(items)
        self.calls.append(("insert_many", [(k, b.block_id, b.ref_cnt, b.size) for k, b in items]))
        self.blocks.update(items)

    def remove(self, key: Key) -> None:
        self.calls.append(("remove", key))
        del self.blocks[key]

    def touch(self, keys: Sequence[Key]) -> None:
        self.calls.append(("touch", list(keys)))

    def evict(self, n: int, protected: Container[Key]) -> list[tuple[Key, BlockStatus]] | None:
        # The ref counts it reads are the manager's, kept current on both cores.
        idle = [k for k, b in self.blocks.items() if b.ref_cnt == 0 and k not in protected]
        held = [k for k in self.blocks if k in protected]
        self.calls.append(("evict", n, sorted(idle, key=repr), sorted(held, key=repr)))
        if len(idle) < n:
            return None
        return [(k, self.blocks.pop(k)) for k in idle[:n]]

    def keys(self) -> Iterator[Key]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __contains__(self, key: object) -> bool:
        return key in self.blocks
