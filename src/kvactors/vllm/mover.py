"""The worker side of the vLLM backend, without vLLM: the bytes.

:class:`PagedRows` gathers blocks of vLLM's paged KV tensors (each a
``(num_blocks, page_bytes)`` int8 view, one per layer) into offload rows of a
host pool and scatters rows back; :class:`BlockMover` owns the CPU pool
(:class:`~kvactors.media.MemoryPool`, pinned where CUDA exists) and the NVMe
store (:class:`~kvactors.media.FileStore`) and runs each job's
:class:`~kvactors.vllm.tiers.TransferPlan` on one thread, in submission order.

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
import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Protocol

import torch

from kvactors.errors import ConfigError, TensorSpecError, TransferError
from kvactors.keys import Key
from kvactors.media import FileStore, MemoryPool, resolve_nvme_backend
from kvactors.media.memory import adjacent_runs
from kvactors.paged.kv_tensors import copy_row_runs
from kvactors.vllm.prefetch import DEMOTE, FETCH, MailboxReader, Move
from kvactors.vllm.tiers import TransferPlan

__all__ = ["BlockMover", "GPUBlocks", "JobResult", "PagedRows"]

log = logging.getLogger("kvactors.vllm")


class Remote(Protocol):
    """What the mover needs of :class:`~kvactors.media.RemoteStore`."""

    def put(self, keys: Sequence[Key], bufs: Sequence[memoryview]) -> list[int]: ...

    def get_into(self, keys: Sequence[Key], bufs: Sequence[memoryview]) -> list[int]: ...

    def close(self) -> None: ...


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


@dataclasses.dataclass(frozen=True)
class JobResult:
    job_id: int
    success: bool
    nbytes: int
    seconds: float


@dataclasses.dataclass
class _Job:
    job_id: int
    store: bool
    blocks: GPUBlocks
    plan: TransferPlan


class BlockMover:
    """The worker's CPU pool and NVMe store, and the thread that runs jobs in order.

    ``cpu_slots`` / ``nvme_slots``: slots of each tier (the scheduler's slot ids
    index them); ``nvme_slots=0``: no NVMe tier. ``mail``: the scheduler's
    prefetch moves (:mod:`kvactors.vllm.prefetch`), polled by the thread every
    ``poll_seconds`` while it has no job, and after every job. ``remote``: the
    remote store stored blocks are also written to and fetches read from.
    """

    poll_seconds = 0.002

    def __init__(
        self,
        rows: PagedRows,
        cpu_slots: int,
        nvme_slots: int = 0,
        *,
        nvme_directory: str | None = None,
        nvme_backend: str = "auto",
        nvme_stripes: int = 1,
        mail: MailboxReader | None = None,
        remote: Remote | None = None,
    ) -> None:
        self.rows = rows
        self.mail = mail
        self.remote = remote
        self.remote_refused = 0
        """Blocks the remote store did not take (down, or refused): logged, not failures."""
        bb = rows.row_bytes
        self.cpu = MemoryPool("cpu", cpu_slots, bb, torch.device("cpu"), pin=True)
        self.nvme: FileStore | None = None
        if nvme_slots > 0:
            self.nvme = FileStore(
                "nvme",
                nvme_slots,
                bb,
                nvme_directory,
                durable=False,
                backend=resolve_nvme_backend(nvme_backend),
                io_threads=max(2, nvme_stripes),
                stripes=nvme_stripes,
            )
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._done: list[JobResult] = []
        self._pending: set[int] = set()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="kvactors-vllm-mover", daemon=True)
        self._thread.start()

    # -- the vLLM worker calls -------------------------------------------------------

    def submit(self, job_id: int, store: bool, blocks: GPUBlocks, plan: TransferPlan) -> None:
        with self._cond:
            self._pending.add(job_id)
        self._queue.put(_Job(job_id, store, blocks, plan))

    def finished(self) -> list[JobResult]:
        with self._cond:
            out, self._done = self._done, []
        return out

    def wait(self, job_ids: set[int]) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not (self._pending & job_ids))

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self.nvme is not None:
            self.nvme.close()
            self.nvme = None
        if self.mail is not None:
            self.mail.close()
            self.mail = None
        if self.remote is not None:
            self.remote.close()
            self.remote = None

    # -- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            if self.mail is None:
                job = self._queue.get()
            else:
                self.serve_mail()
                try:
                    job = self._queue.get(timeout=self.poll_seconds)
                except queue.Empty:
                    continue
            if job is None:
                return
            start = time.perf_counter()
            try:
                self.execute(job.store, job.blocks, job.plan)
                ok = True
            except Exception:  # reported to vLLM as a failed job, logged here
                log.exception(
                    "kvactors: %s job %d failed", "store" if job.store else "load", job.job_id
                )
                ok = False
            result = JobResult(
                job.job_id, ok, self.rows.block_bytes(job.blocks), time.perf_counter() - start
            )
            with self._cond:
                self._pending.discard(job.job_id)
                self._done.append(result)
                self._cond.notify_all()

    def serve_mail(self) -> int:
        """Carry out the prefetch moves posted since the last call; returns how many."""
        if self.mail is None:
            return 0
        moves = self.mail.take()
        i = 0
        while i < len(moves):
            j = i
            while j < len(moves) and moves[j].op == moves[i].op:
                j += 1
            batch = moves[i:j]
            self.mail.report(batch, self._move(batch))
            i = j
        return len(moves)

    def _move(self, moves: list[Move]) -> list[bool]:
        """Moves of one kind between the CPU pool and NVMe; one outcome per move."""
        cpu = [m.cpu_slot for m in moves]
        nvme = [m.nvme_slot for m in moves]
        keys = [m.key for m in moves]
        try:
            if moves[0].op == FETCH:
                if self.remote is None:
                    raise TransferError("remote: a fetch, but no remote tier is configured")
                bad = set(self.remote.get_into(keys, self.cpu.buffers(cpu)))
                return [i not in bad for i in range(len(moves))]
            store = self._nvme()
            if moves[0].op == DEMOTE:
                store.write_buffers(nvme, self.cpu.buffers(cpu), keys)
                return [True] * len(moves)
            bad = set(store.read_buffers(nvme, self.cpu.buffers(cpu), keys))
        except Exception:  # reported to the scheduler as failed moves, logged here
            log.exception("kvactors: %d prefetch moves failed", len(moves))
            return [False] * len(moves)
        if bad:
            log.warning("kvactors: %d prefetched blocks failed their checksum", len(bad))
        return [i not in bad for i in range(len(moves))]

    def execute(self, store: bool, blocks: GPUBlocks, plan: TransferPlan) -> None:
        """Carry out ``plan`` now, on the calling thread (the steps :class:`TransferPlan` lists)."""
        pool = self.cpu.data
        if plan.demote:
            self._nvme().write_buffers(
                plan.demote.nvme_slots, self.cpu.buffers(plan.demote.cpu_slots), plan.demote.keys
            )
        if store:
            self.rows.gather(blocks, pool, plan.cpu_slots)
            if plan.write_through:
                wt = plan.write_through
                self._nvme().write_buffers(wt.nvme_slots, self.cpu.buffers(wt.cpu_slots), wt.keys)
            if plan.remote_put:
                self._put_remote(plan)
            return
        slots = list(plan.cpu_slots)
        if plan.promote:
            pr = plan.promote
            targets = [slots[pos] for pos in pr.cpu_slots]
            scratch_pos = [i for i, s in enumerate(targets) if s < 0]
            scratch = None
            if scratch_pos:
                scratch = torch.empty((len(scratch_pos), self.rows.row_bytes), dtype=torch.uint8)
            bufs = []
            flat = memoryview(scratch.numpy()).cast("B") if scratch is not None else None  # type: ignore[arg-type]
            bb = self.rows.row_bytes
            in_pool = self.cpu.buffers([s for s in targets if s >= 0])
            k = j = 0
            for s in targets:
                if s >= 0:
                    bufs.append(in_pool[k])
                    k += 1
                else:
                    assert flat is not None
                    bufs.append(flat[j * bb : (j + 1) * bb])
                    j += 1
            bad = self._nvme().read_buffers(pr.nvme_slots, bufs, pr.keys)
            if bad:
                raise TransferError(
                    f"nvme: {len(bad)} of {len(pr.keys)} blocks failed their checksum "
                    f"(first key {pr.keys[bad[0]]!r})"
                )
            if scratch is not None:
                self._scatter_with_scratch(blocks, slots, pr.cpu_slots, targets, scratch)
                return
        self.rows.scatter(blocks, pool, slots)

    def _scatter_with_scratch(
        self,
        blocks: GPUBlocks,
        slots: list[int],
        positions: list[int],
        targets: list[int],
        scratch: torch.Tensor,
    ) -> None:
        """Scatter pool rows, then the promoted rows read into ``scratch``."""
        self.rows.scatter(blocks, self.cpu.data, slots)
        from_scratch = [-1] * len(slots)
        j = 0
        for pos, target in zip(positions, targets):
            if target < 0:
                from_scratch[pos] = j
                j += 1
        self.rows.scatter(blocks, scratch, from_scratch)

    def _put_remote(self, plan: TransferPlan) -> None:
        """Stored blocks to the remote store; a refusal or a down server is logged and
        counted, never a failed job (the blocks are in CPU)."""
        put = plan.remote_put
        if self.remote is None:
            raise TransferError("remote: the plan writes remote blocks, but no remote tier")
        try:
            refused = len(self.remote.put(put.keys, self.cpu.buffers(put.cpu_slots)))
        except Exception as exc:  # RemoteUnavailable, or anything the client raised
            log.warning("kvactors: remote store: %d blocks not written: %s", len(put), exc)
            refused = len(put)
        self.remote_refused += refused

    def _nvme(self) -> FileStore:
        if self.nvme is None:
            raise TransferError(
                "nvme: the plan moves blocks to NVMe, but no NVMe tier is configured"
            )
        return self.nvme
