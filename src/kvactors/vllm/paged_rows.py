"""vLLM's paged KV tensors <-> rows of a host pool: the gathers and scatters of a job.

:class:`PagedRows` gathers blocks of vLLM's paged KV tensors (each a
``(num_blocks, page_bytes)`` int8 view, one per layer) into offload rows of a
host pool and scatters rows back; :class:`GPUBlocks` names the blocks of a
job (vLLM's ``GPULoadStoreSpec``).

A row is one offload chunk: ``blocks_per_chunk`` sub-blocks, each the pages of
the group's layers side by side.

Host KV tensors: numpy slice copies, one ``memcpy`` per run of pages adjacent
in both the KV tensor and the pool, single pass
(:func:`~kvactors.paged.kv_tensors.copy_row_runs`; torch's advanced-index
assignment goes element by element on the CPU).

CUDA tensors: whole rows staged on the device (gathers and index copies there),
one asynchronous copy per run of adjacent pool rows to or from the pinned
pool, all on the mover's own stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import torch

from kvactors.errors import ConfigError, TensorSpecError
from kvactors.media.memory import adjacent_runs
from kvactors.paged.kv_tensors import copy_row_runs

__all__ = ["GPUBlocks", "PagedRows"]


@dataclasses.dataclass(frozen=True)
class GPUBlocks:
    """vLLM's ``GPULoadStoreSpec`` as plain lists: blocks grouped by KV cache group."""

    block_ids: list[int]
    group_sizes: list[int]
    block_indices: list[int]


class PagedRows:
    """Moves between paged KV tensors and rows of a host ``(slots, row_bytes)`` pool.

    ``tensors``: the ``(num_blocks, page_bytes)`` int8 block views (vLLM's
    canonical KV tensors), all on one device. ``groups``: per KV cache group,
    the indices of its tensors (their pages make up one sub-block).
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        groups: Sequence[Sequence[int]],
        blocks_per_chunk: int = 1,
    ) -> None:
        if not tensors:
            raise TensorSpecError("kv caches: no tensors")
        if blocks_per_chunk < 1:
            raise ConfigError(f"blocks_per_chunk: must be >= 1, got {blocks_per_chunk}")
        self.device = tensors[0].device
        for i, t in enumerate(tensors):
            if t.dim() != 2 or t.element_size() != 1 or t.stride(1) != 1:
                raise TensorSpecError(
                    f"kv caches[{i}]: expected a (num_blocks, page_bytes) byte view, "
                    f"got shape {tuple(t.shape)} strides {t.stride()} of {t.dtype}"
                )
            if t.device != self.device:
                raise TensorSpecError(f"kv caches[{i}]: on {t.device}, [0] is on {self.device}")
        self.tensors = [t.view(torch.uint8) for t in tensors]
        self.blocks_per_chunk = blocks_per_chunk
        self.groups: list[list[tuple[torch.Tensor, int, int]]] = []
        sub_bytes = []
        for group in groups:
            seen: list[int] = []
            for idx in group:
                if idx not in seen:
                    seen.append(idx)
            layout = []
            offset = 0
            for idx in seen:
                page = self.tensors[idx].shape[1]
                layout.append((self.tensors[idx], idx, offset))
                offset += page
            self.groups.append(layout)
            sub_bytes.append(offset)
        self.sub_bytes = sub_bytes
        self.row_bytes = blocks_per_chunk * max(sub_bytes, default=0)
        self._np = [t.numpy() for t in self.tensors] if self.device.type == "cpu" else []
        self.stream = (
            torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
            if self.device.type == "cuda"
            else None
        )

    def block_bytes(self, blocks: GPUBlocks) -> int:
        """Bytes a job over ``blocks`` moves."""
        return sum(n * self.sub_bytes[g] for g, n in enumerate(blocks.group_sizes))

    def mapping(self, blocks: GPUBlocks) -> list[tuple[int, list[int], list[int], list[int]]]:
        """Per group: ``(group, row positions, sub-block indices, block ids)`` of each block.

        A group's blocks cover consecutive chunks starting at block index
        ``block_indices[g]``; its keys follow the previous groups' keys.
        """
        if len(blocks.group_sizes) > len(self.groups):
            raise TensorSpecError(
                f"spec names {len(blocks.group_sizes)} groups, the caches have {len(self.groups)}"
            )
        bpc = self.blocks_per_chunk
        out = []
        start = 0
        key_base = 0
        for g, n in enumerate(blocks.group_sizes):
            ids = blocks.block_ids[start : start + n]
            start += n
            if not n:
                continue
            b0 = blocks.block_indices[g]
            first_chunk = b0 // bpc
            rows = [key_base + (b0 + j) // bpc - first_chunk for j in range(n)]
            subs = [(b0 + j) % bpc for j in range(n)]
            out.append((g, rows, subs, list(ids)))
            key_base += (b0 + n - 1) // bpc - first_chunk + 1
        return out

    def gather(self, blocks: GPUBlocks, pool: torch.Tensor, slots: Sequence[int]) -> None:
        """``pool[slots[row]]`` <- the blocks of each row (a store); rows whose slot is
        negative are skipped (so are they in :meth:`scatter`)."""
        self._move(blocks, pool, slots, to_pool=True)

    def scatter(self, blocks: GPUBlocks, pool: torch.Tensor, slots: Sequence[int]) -> None:
        """The blocks of each row <- ``pool[slots[row]]`` (a load)."""
        self._move(blocks, pool, slots, to_pool=False)

    def _move(
        self, blocks: GPUBlocks, pool: torch.Tensor, slots: Sequence[int], to_pool: bool
    ) -> None:
        if self.device.type != "cpu":
            self._move_device(blocks, pool, slots, to_pool)
            return
        for g, rows, subs, ids in self.mapping(blocks):
            for sub in range(self.blocks_per_chunk):
                sel = [i for i in range(len(ids)) if subs[i] == sub and slots[rows[i]] >= 0]
                if not sel:
                    continue
                pool_rows = [slots[rows[i]] for i in sel]
                block_ids = [ids[i] for i in sel]
                base = sub * self.sub_bytes[g]
                for tensor, idx, offset in self.groups[g]:
                    cols = pool.numpy()[:, base + offset : base + offset + tensor.shape[1]]
                    kv = self._np[idx]
                    if to_pool:
                        copy_row_runs(kv, block_ids, cols, pool_rows)
                    else:
                        copy_row_runs(cols, pool_rows, kv, block_ids)

    def _move_device(
        self, blocks: GPUBlocks, pool: torch.Tensor, slots: Sequence[int], to_pool: bool
    ) -> None:
        """Through a device staging buffer of whole rows (one per key of the job):
        gathers and index copies on the device, whole-row copies to and from the
        (pinned) pool, one per run of adjacent pool rows, all on the mover's stream
        (written for CUDA; it runs on any device, which is how it is tested here)."""
        plan = self.mapping(blocks)
        num_rows = 1 + max((max(rows) for _, rows, _, _ in plan), default=-1)
        rows_used = [r for r in range(num_rows) if slots[r] >= 0]
        runs = adjacent_runs(rows_used, [slots[r] for r in rows_used])
        on_stream = (
            torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        )
        with on_stream:
            staged = torch.empty((num_rows, self.row_bytes), dtype=torch.uint8, device=self.device)
            if not to_pool:
                for r0, first, n in runs:
                    staged[r0 : r0 + n].copy_(pool[first : first + n], non_blocking=True)
            for g, rows, subs, ids in plan:
                for sub in range(self.blocks_per_chunk):
                    sel = [i for i in range(len(ids)) if subs[i] == sub and slots[rows[i]] >= 0]
                    if not sel:
                        continue
                    ridx = torch.tensor([rows[i] for i in sel], dtype=torch.long)
                    bidx = torch.tensor([ids[i] for i in sel], dtype=torch.long)
                    ridx, bidx = ridx.to(self.device), bidx.to(self.device)
                    base = sub * self.sub_bytes[g]
                    for tensor, _, offset in self.groups[g]:
                        lo, hi = base + offset, base + offset + tensor.shape[1]
                        if to_pool:
                            staged[ridx, lo:hi] = tensor.index_select(0, bidx)
                        else:
                            tensor.index_copy_(0, bidx, staged[ridx, lo:hi])
            if to_pool:
                for r0, first, n in runs:
                    pool[first : first + n].copy_(staged[r0 : r0 + n], non_blocking=True)
        if self.stream is not None:
            self.stream.synchronize()
