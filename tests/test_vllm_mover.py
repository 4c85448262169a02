"""The worker side of the vLLM backend (no vLLM needed): bytes between paged KV
tensors, the CPU pool and the NVMe files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvactors.errors import CacheLockedError, TensorSpecError, TransferError
from kvactors.vllm.mover import BlockMover, GPUBlocks, PagedRows
from kvactors.vllm.tiers import TieredManager


def caches(layers: int, blocks: int, page: int, stride: int | None = None) -> list[torch.Tensor]:
    """``(blocks, page)`` int8 views like vLLM's canonical KV tensors (maybe padded rows)."""
    gen = torch.Generator().manual_seed(layers * 1000 + page)
    out = []
    for _ in range(layers):
        s = stride or page
        raw = torch.randint(-128, 128, (blocks * s,), dtype=torch.int8, generator=gen)
        out.append(raw.as_strided((blocks, page), (s, 1)))
    return out


def expected_row(tensors: list[torch.Tensor], block: int) -> torch.Tensor:
    return torch.cat([t[block].view(torch.uint8) for t in tensors])


@settings(max_examples=40, deadline=None)
@given(
    ids=st.lists(st.integers(0, 31), min_size=1, max_size=12, unique=True),
    slots=st.permutations(list(range(12))),
    padded=st.booleans(),
)
def test_gather_then_scatter_round_trips(ids: list[int], slots: list[int], padded: bool) -> None:
    tensors = caches(3, 32, 64, 96 if padded else None)
    rows = PagedRows(tensors, [[0, 1, 2]])
    pool = torch.zeros((12, rows.row_bytes), dtype=torch.uint8)
    spec = GPUBlocks(ids, [len(ids)], [0])
    chosen = slots[: len(ids)]
    rows.gather(spec, pool, chosen)
    for b, s in zip(ids, chosen):
        assert torch.equal(pool[s], expected_row(tensors, b))
    before = [t.clone() for t in tensors]
    for t in tensors:
        t[ids] = 0
    rows.scatter(spec, pool, chosen)
    for t, b in zip(tensors, before):
        assert torch.equal(t, b)


def test_blocks_per_chunk_and_groups() -> None:
    tensors = caches(2, 16, 32)
    rows = PagedRows(tensors, [[0], [1]], blocks_per_chunk=2)
    assert rows.row_bytes == 64
    pool = torch.zeros((4, 64), dtype=torch.uint8)
    # group 0: blocks 5, 6, 7 at block index 1 (chunks 0 and 1: sub-blocks 1 | 0, 1);
    # group 1: blocks 9, 3 at block index 0 (chunk 0)
    spec = GPUBlocks([5, 6, 7, 9, 3], [3, 2], [1, 0])
    rows.gather(spec, pool, [2, 0, 3])
    u = [t.view(torch.uint8) for t in tensors]
    assert torch.equal(pool[2, 32:], u[0][5])
    assert torch.equal(pool[0, :32], u[0][6])
    assert torch.equal(pool[0, 32:], u[0][7])
    assert torch.equal(pool[3, :32], u[1][9])
    assert torch.equal(pool[3, 32:], u[1][3])


@pytest.mark.parametrize("device_path", [False, True])
def test_rows_with_no_slot_are_skipped(device_path: bool) -> None:
    """Slot -1 rows are left out; ``device_path`` runs the staging path CUDA uses
    (whole rows staged, row runs copied) on CPU tensors."""
    tensors = caches(2, 16, 32)
    rows = PagedRows(tensors, [[0, 1]])
    pool = torch.zeros((8, rows.row_bytes), dtype=torch.uint8)
    spec = GPUBlocks([3, 9, 4, 7], [4], [0])
    slots = [5, -1, 6, 2]
    move = rows._move_device if device_path else rows._move
    move(spec, pool, slots, True)
    for b, s in ((3, 5), (4, 6), (7, 2)):
        assert torch.equal(pool[s], expected_row(tensors, b))
    assert not pool[[0, 1, 3, 4, 7]].any()
    before = [t.clone() for t in tensors]
    for t in tensors:
        t.zero_()
    move(spec, pool, slots, False)
    for t, o in zip(tensors, before):
        for b in (3, 4, 7):
            assert torch.equal(t[b], o[b])
        assert not t[9].any()


def test_bad_tensors_are_named() -> None:
    with pytest.raises(TensorSpecError, match="no tensors"):
        PagedRows([], [[]])
    with pytest.raises(TensorSpecError, match=r"kv caches\[0\]"):
        PagedRows([torch.zeros(4, 4, dtype=torch.float32)], [[0]])


def test_mover_demotes_promotes_and_verifies(tmp_path: Path) -> None:
    """Plans from the real scheduler-side manager, bytes through the real pool and files."""
    tensors = caches(2, 32, 128)
    rows = PagedRows(tensors, [[0, 1]])
    mover = BlockMover(rows, 4, 16, nvme_directory=str(tmp_path / "nvme"), nvme_backend="posix")
    tiers = TieredManager(4, 16)
    keys = [bytes([i]) * 12 for i in range(8)]
    try:
        for first in (0, 4):  # store blocks 0..3 then 4..7: the first four are demoted
            batch = keys[first : first + 4]
            out = tiers.prepare_store(batch)
            assert out is not None
            mover.submit(first, True, GPUBlocks(list(range(first, first + 4)), [4], [0]), out[1])
            mover.wait({first})
            tiers.complete_store(out[0])
        assert [r.success for r in mover.finished()] == [True, True]
        originals = [t.clone() for t in tensors]
        # load keys 0 and 1 (NVMe, promoted) and 5 (CPU) into blocks 20, 21, 22
        load = [keys[0], keys[1], keys[5]]
        plan = tiers.prepare_load(load)
        assert len(plan.promote) == 2
        mover.submit(7, False, GPUBlocks([20, 21, 22], [3], [0]), plan)
        mover.wait({7})
        (result,) = mover.finished()
        assert result.success
        assert result.nbytes == 3 * rows.row_bytes
        tiers.complete_load(load)
        for t, o in zip(tensors, originals):
            assert torch.equal(t[20], o[0])
            assert torch.equal(t[21], o[1])
            assert torch.equal(t[22], o[5])
        # corrupt NVMe block 2's file bytes: its load must fail, not deliver them
        assert mover.nvme is not None
        plan = tiers.prepare_load([keys[2]])
        slot = plan.promote.nvme_slots[0]
        path = next((tmp_path / "nvme").glob("blocks*.bin"))
        with path.open("r+b") as f:
            f.seek(slot * rows.row_bytes)
            f.write(b"\xff" * 16)
        with pytest.raises(TransferError, match="checksum"):
            mover.execute(False, GPUBlocks([23], [1], [0]), plan)
        mover.submit(8, False, GPUBlocks([23], [1], [0]), plan)
        mover.wait({8})
        assert [r.success for r in mover.finished()] == [False]
    finally:
        mover.close()


def test_promotion_without_a_cpu_slot_reads_into_scratch(tmp_path: Path) -> None:
    tensors = caches(1, 8, 64)
    rows = PagedRows(tensors, [[0]])
    mover = BlockMover(rows, 2, 4, nvme_directory=str(tmp_path), nvme_backend="posix")
    tiers = TieredManager(2, 4)
    keys = [bytes([i]) * 12 for i in range(4)]
    try:
        for first in (0, 2):
            out = tiers.prepare_store(keys[first : first + 2])
            assert out is not None
            mover.execute(True, GPUBlocks([first, first + 1], [2], [0]), out[1])
            tiers.complete_store(out[0])
        want = tensors[0][0].clone()
        pin = tiers.prepare_load(keys[2:4])  # both CPU slots pinned: no room to promote
        plan = tiers.prepare_load([keys[0]])
        assert plan.cpu_slots == [-1]
        mover.execute(False, GPUBlocks([6], [1], [0]), plan)
        assert torch.equal(tensors[0][6], want)
        del pin
    finally:
        mover.close()


def _mover_holding_one_block(rows: PagedRows, directory: str) -> BlockMover:
    """A mover (4 CPU, 16 NVMe slots, posix I/O) on ``directory`` that has written
    one block through to NVMe (checked indexed there); the caller closes it."""
    mover = BlockMover(rows, 4, 16, nvme_directory=directory, nvme_backend="posix")
    try:
        tiers = TieredManager(4, 16, write_mode="through")
        out = tiers.prepare_store([b"k" * 12])
        assert out is not None
        assert len(out[1].write_through) == 1
        mover.execute(True, GPUBlocks([0], [1], [0]), out[1])
        assert mover.nvme is not None
        assert len(mover.nvme.index.by_key) == 1
    except BaseException:
        mover.close()
        raise
    return mover


def test_a_second_mover_on_the_same_nvme_directory_starts_it_fresh(tmp_path: Path) -> None:
    """The NVMe directory is scratch space: a later engine (even with another NVMe
    size) starts it empty instead of finding, or refusing, the previous run's files."""
    rows = PagedRows(caches(2, 32, 128), [[0, 1]])
    directory = str(tmp_path / "nvme")
    _mover_holding_one_block(rows, directory).close()
    for slots in (16, 8):
        again = BlockMover(rows, 4, slots, nvme_directory=directory, nvme_backend="posix")
        try:
            assert again.nvme is not None
            assert again.nvme.recovered() == []
        finally:
            again.close()


def test_a_second_mover_while_the_first_runs_is_refused_and_deletes_nothing(
    tmp_path: Path,
) -> None:
    """docs/vllm.md: two engines at once on one NVMe directory are refused
    (CacheLockedError); the fresh start happens only under the lock, so the running
    one's blocks stay indexed."""
    rows = PagedRows(caches(2, 32, 128), [[0, 1]])
    directory = str(tmp_path / "nvme")
    first = _mover_holding_one_block(rows, directory)
    try:
        assert first.nvme is not None
        files = sorted(p.name for p in (tmp_path / "nvme").iterdir())
        with pytest.raises(CacheLockedError, match="in use"):
            BlockMover(rows, 4, 16, nvme_directory=directory, nvme_backend="posix")
        assert sorted(p.name for p in (tmp_path / "nvme").iterdir()) == files
        assert len(first.nvme.index.by_key) == 1
    finally:
        first.close()
