"""The worker side of the vLLM backend, without vLLM: the thread that moves the bytes.

:class:`BlockMover` owns the CPU pool (:class:`~kvactors.media.MemoryPool`,
pinned where CUDA exists) and the NVMe store (:class:`~kvactors.media.FileStore`)
and runs each job's :class:`~kvactors.vllm.tiers.TransferPlan` on one thread,
in submission order, between those tiers, the remote store and vLLM's paged
KV tensors (through :class:`~kvactors.vllm.paged_rows.PagedRows`). Between
jobs the thread carries out the scheduler's prefetch moves
(:mod:`kvactors.vllm.prefetch`).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Protocol

import torch

from kvactors.errors import TransferError
from kvactors.keys import Key
from kvactors.media import FileStore, MemoryPool, resolve_nvme_backend
from kvactors.vllm.paged_rows import GPUBlocks, PagedRows
from kvactors.vllm.prefetch import DEMOTE, FETCH, MailboxReader, Move
from kvactors.vllm.tiers import TransferPlan

__all__ = ["BlockMover", "GPUBlocks", "JobResult", "PagedRows"]

log = logging.getLogger("kvactors.vllm")


class Remote(Protocol):
    """What the mover needs of :class:`~kvactors.media.RemoteStore`."""

    def put(self, keys: Sequence[Key], bufs: Sequence[memoryview]) -> list[int]: ...

    def fetch(
        self, keys: Sequence[Key], bufs: Sequence[memoryview]
    ) -> tuple[list[int], list[int]]: ...

    def drop(self, keys: list[Key]) -> None: ...

    def close(self) -> None: ...


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
                fresh=True,  # scratch space: an earlier run's files are not served
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
                absent, refused = self.remote.fetch(keys, self.cpu.buffers(cpu))
                if refused:  # truncated, garbage, foreign: no engine should fetch it again
                    log.warning("kvactors: %d fetched values were damaged; deleted", len(refused))
                    self.remote.drop([keys[i] for i in refused])
                bad = set(absent) | set(refused)
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
