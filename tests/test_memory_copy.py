"""How copy_rows splits a host copy over a cache's copy threads."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from kvactors.media import memory
from kvactors.media.memory import CopyPool, copy_rows

BB = 64


@pytest.mark.parametrize(
    ("rows", "workers", "parts"),
    [(3, 1, 1), (4, 1, 2), (3, 3, 1), (5, 3, 2), (6, 3, 3), (8, 3, 4), (40, 3, 4), (40, 0, 1)],
)
def test_each_part_of_a_split_copy_moves_at_least_split_copy_bytes(
    monkeypatch: pytest.MonkeyPatch, rows: int, workers: int, parts: int
) -> None:
    monkeypatch.setattr(memory, "SPLIT_COPY_BYTES", 2 * BB)
    seen: list[int] = []
    fan_out = memory._fan_out

    def counting(pool: Any, fn: Any, chunks: list[Any]) -> Any:
        seen.append(len(chunks))
        return fan_out(pool, fn, chunks)

    monkeypatch.setattr(memory, "_fan_out", counting)
    rng = random.Random(rows)
    src = torch.randint(0, 255, (64, BB), dtype=torch.uint8)
    dst = torch.zeros((64, BB), dtype=torch.uint8)
    src_ids = rng.sample(range(64), rows)
    dst_ids = rng.sample(range(64), rows)
    copier = CopyPool(workers)
    try:
        copy_rows(src, src_ids, dst, dst_ids, copier)
    finally:
        copier.close()
    assert seen == ([parts] if parts > 1 else [])
    assert torch.equal(dst[dst_ids], src[src_ids])
    assert not dst[sorted(set(range(64)) - set(dst_ids))].any()
