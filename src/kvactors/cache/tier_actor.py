"""Tier actors: one per medium, running Write / Read / Copy / Drop jobs on slot ids.

A tier actor owns its medium's bytes (never its metadata: that is the policy
actor's). Jobs run in worker threads under the tier's own
``anyio.CapacityLimiter`` so the event loop never blocks on a large copy or a
file. Jobs of at most ``inline_bytes`` between memory media (never a file) run
inline on the event loop, where a thread hop would cost more than the copy;
an idle tier actor runs them in the asker's task (``handle_now``), so such a
job costs neither a thread hop nor a mailbox round trip. With
``concurrency`` > 1 several jobs are in flight at once: the policy actor hands
every slot to one job only, so jobs never touch the same slot.

Every reply is a :class:`JobReport` (bytes moved, seconds). A failure reaches
the asker as :class:`~kvactors.errors.TransferError` naming the tier and job;
the actor keeps serving.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import msgspec
import torch

from kvactors.actors import NOT_NOW, Actor
from kvactors.errors import IntegrityError, KVActorsError, TransferError
from kvactors.keys import Key
from kvactors.media import BlockMedium, FileStore, MemoryPool, copy_rows

__all__ = [
    "Copy",
    "Drop",
    "JobReport",
    "OpStats",
    "Read",
    "TierActor",
    "TierRequest",
    "TierStats",
    "Write",
]


# -- jobs -------------------------------------------------------------------------


class Write(msgspec.Struct, frozen=True, tag=True):
    """Write ``rows[i]`` into slot ``ids[i]`` (as block ``keys[i]`` when given)."""

    ids: list[int]
    rows: Any  # torch.Tensor (n, block_bytes) uint8
    keys: list[Key] | None = None


class Read(msgspec.Struct, frozen=True, tag=True):
    """Read slot ``ids[i]`` into ``rows[i]``, verified as block ``keys[i]`` when given."""

    ids: list[int]
    rows: Any  # torch.Tensor (n, block_bytes) uint8
    keys: list[Key] | None = None


class Copy(msgspec.Struct, frozen=True, tag=True):
    """Copy slot ``src_ids[i]`` of ``src`` (another medium) into this tier's ``ids[i]``,
    or the other way round with ``outbound=True``. ``keys`` name the blocks."""

    src: Any  # BlockMedium
    src_ids: list[int]
    ids: list[int]
    outbound: bool = False
    keys: list[Key] | None = None


class Drop(msgspec.Struct, frozen=True, tag=True):
    """Forget blocks ``keys`` (their bytes need not survive)."""

    keys: list[Key]


class Crash(msgspec.Struct, frozen=True, tag=True):
    """Test hook: make the actor fail every job from now on (simulates a dead device)."""

    reason: str


TierRequest = Write | Read | Copy | Drop | Crash


class JobReport(msgspec.Struct, frozen=True):
    tier: str
    op: str
    blocks: int
    bytes: int
    seconds: float


class OpStats(msgspec.Struct, frozen=True):
    """Totals of one kind of job: ``write``, ``read``, ``copy_in`` or ``copy_out``."""

    jobs: int
    bytes: int
    seconds: float


class TierStats(msgspec.Struct, frozen=True):
    """``copy_in`` moved bytes from another medium into this tier, ``copy_out`` the other way."""

    name: str
    jobs: int
    failed_jobs: int
    bytes_read: int
    bytes_written: int
    busy_seconds: float
    ops: dict[str, OpStats]
    crashed: str | None


class TierActor(Actor[TierRequest]):
    """The actor of one medium; see the module docstring."""

    def __init__(
        self,
        medium: BlockMedium,
        *,
        threads: int = 2,
        mailbox_size: int = 64,
        inline_bytes: int = 256 * 1024,
    ) -> None:
        super().__init__(medium.name, mailbox_size=mailbox_size, concurrency=threads)
        self.medium = medium
        self.limiter = anyio.CapacityLimiter(threads)
        self.inline_bytes = inline_bytes
        self._jobs = 0
        self._failed_jobs = 0
        self._bytes_read = 0
        self._bytes_written = 0
        self._busy = 0.0
        self._ops: dict[str, list[float]] = {}
        self._crashed: str | None = None

    def handle_now(self, message: TierRequest) -> Any:
        # Small memory-to-memory jobs run right here, on the event loop: a
        # worker-thread hop costs more than copying ``inline_bytes``. File I/O
        # and larger copies return ``NOT_NOW`` and go to :meth:`handle`.
        if self._crashed is not None:
            raise TransferError(f"tier {self.name!r} is down: {self._crashed}")
        match message:
            case Write(ids, rows, keys):
                if self._inline(len(ids), None):
                    return self._run("write", len(ids), self.medium.write_from, ids, rows, keys)
            case Read(ids, rows, keys):
                if self._inline(len(ids), None):
                    return self._run("read", len(ids), _read, self.medium, ids, rows, keys)
            case Copy(src, src_ids, ids, outbound, keys):
                if self._inline(len(ids), src):
                    op = "copy_out" if outbound else "copy_in"
                    args = (src, src_ids, self.medium, ids, outbound, keys)
                    return self._run(op, len(ids), _copy, *args)
            case Drop(keys):
                if self.medium.in_memory:
                    self._run("drop", 0, self.medium.drop, keys)
                    return None
            case Crash(reason):
                self._crashed = reason
                return None
        return NOT_NOW

    async def handle(self, message: TierRequest) -> JobReport | None:
        result = self.handle_now(message)
        if result is not NOT_NOW:
            return result  # type: ignore[no-any-return]
        match message:
            case Write(ids, rows, keys):
                return await self._job("write", len(ids), self.medium.write_from, ids, rows, keys)
            case Read(ids, rows, keys):
                return await self._job("read", len(ids), _read, self.medium, ids, rows, keys)
            case Copy(src, src_ids, ids, outbound, keys):
                op = "copy_out" if outbound else "copy_in"
                args = (src, src_ids, self.medium, ids, outbound, keys)
                return await self._job(op, len(ids), _copy, *args)
            case Drop(keys):
                await self._job("drop", 0, self.medium.drop, keys)
                return None
        raise AssertionError(f"tier {self.name!r}: unhandled {message!r}")  # pragma: no cover

    def can_run_now(self, blocks: int, other: BlockMedium | None = None) -> bool:
        """Whether :meth:`ask_now` would run a job of ``blocks`` between this medium
        and ``other`` at once: the actor is idle and up, and the job is inline."""
        return self.idle and self._crashed is None and self._inline(blocks, other)

    def _inline(self, blocks: int, other: BlockMedium | None) -> bool:
        """Whether a job of ``blocks`` runs on the event loop: memory on both
        sides (never a file) and at most ``inline_bytes``."""
        return (
            self.medium.in_memory
            and (other is None or other.in_memory)
            and blocks * self.medium.block_bytes <= self.inline_bytes
        )

    @contextlib.contextmanager
    def _failures(self, op: str, blocks: int) -> Iterator[None]:
        """Count a failed job; a medium's own error becomes a TransferError naming it."""
        try:
            yield
        except KVActorsError:
            self._failed_jobs += 1
            raise
        except Exception as exc:
            self._failed_jobs += 1
            raise TransferError(
                f"tier {self.name!r}: {op} of {blocks} blocks failed: {exc}"
            ) from exc

    def _run(self, op: str, blocks: int, fn: Callable[..., object], *args: Any) -> JobReport:
        """Run a small job inline (blocking, briefly)."""
        t0 = time.perf_counter()
        with self._failures(op, blocks):
            fn(*args)
        return self._done(op, blocks, time.perf_counter() - t0)

    async def _job(self, op: str, blocks: int, fn: Callable[..., object], *args: Any) -> JobReport:
        """Run a job in a worker thread under the tier's limiter."""
        spent = [0.0]

        def timed() -> None:
            # Time the work itself, not the wait for a worker thread.
            t0 = time.perf_counter()
            try:
                fn(*args)
            finally:
                spent[0] = time.perf_counter() - t0

        with self._failures(op, blocks):
            await anyio.to_thread.run_sync(timed, limiter=self.limiter)
        return self._done(op, blocks, spent[0])

    def _done(self, op: str, blocks: int, seconds: float) -> JobReport:
        nbytes = blocks * self.medium.block_bytes
        self._jobs += 1
        self._busy += seconds
        acc = self._ops.get(op)
        if acc is None:
            acc = self._ops[op] = [0, 0, 0.0]
        acc[0] += 1
        acc[1] += nbytes
        acc[2] += seconds
        if op in ("write", "copy_in"):
            self._bytes_written += nbytes
        else:
            self._bytes_read += nbytes
        return JobReport(self.name, op, blocks, nbytes, seconds)

    async def on_stop(self) -> None:
        self.medium.close()

    def tier_stats(self) -> TierStats:
        return TierStats(
            name=self.name,
            jobs=self._jobs,
            failed_jobs=self._failed_jobs,
            bytes_read=self._bytes_read,
            bytes_written=self._bytes_written,
            busy_seconds=self._busy,
            ops={op: OpStats(int(a[0]), int(a[1]), a[2]) for op, a in self._ops.items()},
            crashed=self._crashed,
        )


def _read(medium: BlockMedium, ids: list[int], rows: torch.Tensor, keys: list[Key] | None) -> None:
    """Read, turning failed verifications into :class:`IntegrityError` (blocking)."""
    _raise_bad(medium, medium.read_into(ids, rows, keys), keys)


def _raise_bad(medium: BlockMedium, bad: list[int], keys: list[Key] | None) -> None:
    if bad:
        assert keys is not None
        bad_keys = [keys[i] for i in bad]
        raise IntegrityError(
            f"tier {medium.name!r}: {len(bad)} block(s) failed their checksum: {bad_keys[:8]!r}",
            bad_keys,
        )


def _copy(
    src: BlockMedium,
    src_ids: list[int],
    dst: BlockMedium,
    dst_ids: list[int],
    outbound: bool,
    keys: list[Key] | None,
) -> None:
    """Copy between two media (blocking), without staging where the media allow."""
    if outbound:
        src, dst, src_ids, dst_ids = dst, src, dst_ids, src_ids
    if isinstance(src, MemoryPool) and isinstance(dst, MemoryPool):
        with src._on_stream():
            copy_rows(src.data, src_ids, dst.data, dst_ids)
        src._finish()
        return
    if isinstance(src, MemoryPool) and isinstance(dst, FileStore) and src.device.type == "cpu":
        dst.write_buffers(dst_ids, src.buffers(src_ids), keys)
        return
    if isinstance(src, FileStore) and isinstance(dst, MemoryPool) and dst.device.type == "cpu":
        bad = src.read_buffers(src_ids, dst.buffers(dst_ids), keys)
        _raise_bad(src, bad, keys)
        return
    # Pinned staging (CUDA only) lets host <-> device copies run as DMA.
    staging = torch.empty(
        (len(src_ids), src.block_bytes), dtype=torch.uint8, pin_memory=torch.cuda.is_available()
    )
    _read(src, src_ids, staging, keys)
    dst.write_from(dst_ids, staging, keys)
