"""How copy_rows splits a host copy over a cache's copy threads."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from kvactors.media import memory
from kvactors.media.memory import CopyPool, copy_rows

BB = 64


def split_copy(
    monkeypatch: pytest.MonkeyPatch,
    src: torch.Tensor,
    src_ids: list[int],
    dst: torch.Tensor,
    dst_ids: list[int],
    copier: CopyPool,
) -> list[int]:
    """``copy_rows`` from ``src`` to ``dst`` over ``copier`` (closed after), and the
    number of parts of each copy it split: the rows must land where a plain
    gather/scatter puts them, and nowhere else."""
    seen: list[int] = []
    fan_out = memory._fan_out

    def counting(pool: Any, fn: Any, chunks: list[Any]) -> Any:
        seen.append(len(chunks))
        return fan_out(pool, fn, chunks)

    monkeypatch.setattr(memory, "_fan_out", counting)
    try:
        copy_rows(src, src_ids, dst, dst_ids, copier)
    finally:
        copier.close()
    assert torch.equal(dst[dst_ids], src[src_ids])
    assert not dst[sorted(set(range(len(dst))) - set(dst_ids))].any()
    return seen


@pytest.mark.parametrize(
    ("rows", "workers", "parts"),
    [(3, 1, 1), (4, 1, 2), (3, 3, 1), (5, 3, 2), (6, 3, 3), (8, 3, 4), (40, 3, 4), (40, 0, 1)],
)
def test_each_part_of_a_split_copy_moves_at_least_split_copy_bytes(
    monkeypatch: pytest.MonkeyPatch, rows: int, workers: int, parts: int
) -> None:
    monkeypatch.setattr(memory, "SPLIT_COPY_BYTES", 2 * BB)
    rng = random.Random(rows)
    src = torch.randint(0, 255, (64, BB), dtype=torch.uint8)
    dst = torch.zeros((64, BB), dtype=torch.uint8)
    src_ids = rng.sample(range(64), rows)
    dst_ids = rng.sample(range(64), rows)
    seen = split_copy(monkeypatch, src, src_ids, dst, dst_ids, CopyPool(workers))
    assert seen == ([parts] if parts > 1 else [])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_large_host_copies_split_over_threads_move_the_same_bytes(
    monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    """From SPLIT_COPY_BYTES up, copy_rows splits the runs over a copy pool of
    torch's thread count; every row lands where a plain gather/scatter puts it."""
    block = 4096
    monkeypatch.setattr(memory, "SPLIT_COPY_BYTES", 4 * block)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    rng = random.Random(threads)
    g = torch.Generator().manual_seed(3)
    src = torch.randint(0, 256, (64, block), dtype=torch.uint8, generator=g)
    dst = torch.zeros((80, block), dtype=torch.uint8)
    src_ids = rng.sample(range(64), 40)
    dst_ids = rng.sample(range(80), 40)
    copier = CopyPool()  # torch's thread count less the calling thread
    parts = split_copy(monkeypatch, src, src_ids, dst, dst_ids, copier)
    assert parts == ([threads] if threads > 1 else [])  # 40 rows: 10 parts' worth
