"""The protocol every medium follows: bytes of slots, blocking calls."""

from __future__ import annotations

from typing import Protocol

import torch

from kvactors.keys import Key

__all__ = ["BlockMedium"]


class BlockMedium(Protocol):
    """Bytes of ``num_blocks`` slots of ``block_bytes`` each; blocking calls.

    ``rows`` tensors are ``(n, block_bytes)`` ``uint8``; ``ids`` are slot ids,
    unique within one call.
    """

    name: str
    num_blocks: int
    block_bytes: int
    in_memory: bool

    def read_into(
        self, ids: list[int], rows: torch.Tensor, keys: list[Key] | None = None
    ) -> list[int]:
        """Fill ``rows``; return the positions that failed verification against ``keys``."""
        ...

    def write_from(self, ids: list[int], rows: torch.Tensor, keys: list[Key] | None = None) -> None:
        """Write ``rows``; media that index blocks record them under ``keys``."""
        ...

    def drop(self, keys: list[Key]) -> None:
        """Forget blocks ``keys`` (media that index blocks remove their records)."""
        ...

    def close(self) -> None: ...
