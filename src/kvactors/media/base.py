"""The protocol every medium follows: bytes of slots, blocking calls."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from kvactors.keys import Key

__all__ = ["BlockMedium", "Recovered"]


class Recovered(Protocol):
    """A block a medium still held when it was opened."""

    @property
    def key(self) -> Key: ...

    @property
    def slot(self) -> int: ...


class BlockMedium(Protocol):
    """Bytes of ``num_blocks`` slots of ``block_bytes`` each; blocking calls, which
    tier actors run in worker threads (or inline, for small memory copies).

    Two kinds, told apart by :meth:`tensor`:

    - memory media (the GPU pool, the CPU tier) hold every slot in one
      ``(num_blocks, block_bytes)`` uint8 tensor, which :meth:`tensor` returns;
      transfers copy rows of it directly;
    - other media (files, a remote store) return ``None`` and move bytes with
      :meth:`read_buffers` / :meth:`write_buffers`, one host buffer per block.

    ``durable``: what this medium holds survives a crash of the process.
    ``ids`` are slot ids, unique within one call; ``keys[i]`` names slot
    ``ids[i]``'s block where media index or verify blocks.
    """

    name: str
    num_blocks: int
    block_bytes: int
    in_memory: bool
    durable: bool

    def tensor(self) -> torch.Tensor | None:
        """Every slot as one tensor (memory media), else ``None``."""
        ...

    def read_buffers(
        self, ids: list[int], bufs: list[memoryview], keys: list[Key] | None = None
    ) -> list[int]:
        """Read slot ``ids[i]`` into ``bufs[i]``; return the positions that failed
        verification against ``keys``."""
        ...

    def write_buffers(
        self, ids: list[int], bufs: list[memoryview], keys: list[Key] | None = None
    ) -> None:
        """Write ``bufs[i]`` into slot ``ids[i]``; media that index blocks record
        them under ``keys`` once the bytes are safe."""
        ...

    def recovered(self) -> Sequence[Recovered]:
        """Blocks the medium held when opened, oldest first (not yet verified)."""
        ...

    def drop(self, keys: list[Key]) -> None:
        """Forget blocks ``keys`` (media that index blocks remove their records)."""
        ...

    def close(self) -> None: ...
