"""Tier actors: one per tier of the chain, running the transfers its medium does.

A tier actor owns its medium's bytes (never its metadata: that is the policy
actor's). It runs every transfer with one end on its medium and the other on a
tier above it, the GPU pool or the caller's side (:func:`~kvactors.cache.
transfers.runner`), so a transfer's I/O runs in the threads of the medium
doing it: the tier's own ``threads`` worker threads
(:class:`~kvactors.actors.Threads`). Only memory-to-memory copies on the host
of at most ``inline_bytes`` (``Config.inline_bytes``, 4 MiB by default) run on
the event loop, where a thread hop would cost a quarter to a half of the
copy. A promotion carrying the load that follows it (``Move.then``) runs both
in one job: the blocks are read into the top tier, verified, then copied out to
the caller, with one thread hop. With ``threads`` > 1 several transfers are
in flight at once: the policy actor hands every slot to one plan only, so they
never touch the same slot.

A failure reaches the asker as :class:`~kvactors.errors.TransferError` naming
the tier (or the medium's own typed error). A medium that raises
:class:`~kvactors.errors.TierFailed` is down: every later transfer fails with
it at once, and ``tier_stats().crashed`` says why; when the error has a
``retry_after`` (a remote server that did not answer), only for that many
seconds, after which the next transfer tries the medium again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import Any

from kvactors.actors import Actor, Threads
from kvactors.cache.messages import Contains, Forget, JobReport, Move, TierRequest
from kvactors.cache.results import OpStats, TierStats
from kvactors.cache.transfers import Side, check_read, move
from kvactors.errors import KVActorsError, TierFailed, TransferError
from kvactors.keys import Key
from kvactors.media import BlockMedium, CopyPool, copy_rows, row_buffers

__all__ = ["TierActor"]


def _timed(fn: Callable[..., object], args: tuple[Any, ...]) -> float:
    """Run ``fn(*args)`` and return the seconds it took: the work itself, not the
    wait for a worker thread."""
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


STREAM_COPY_BYTES = 1 * 2**20
"""Blocks a promotion's load hands to the copy thread at once, about (a block
larger goes alone), while the promotion reads the next (:func:`_streamed`)."""

STREAM_BLOCK_BYTES = 512 * 1024
"""Blocks a promotion's load copies out while the next arrive are at least this
large: smaller values keep the reading thread busy in Python per value, and a
copy thread beside it slowed the read more than it saved (64 KiB blocks:
8 MiB loads 10.7 ms median against 9.5 without, 30 pairs; 512 KiB and
2 MiB: 10.0 against 11.3 and 10.2 against 13.3, 40 pairs)."""


def _streamed(src: Side, dst: Side, keys: list[Key], then: Move, pool: CopyPool | None) -> float:
    """Read ``keys`` from ``src`` into ``dst``'s host slots and copy those ``then``
    loads out to its host rows as they arrive: once every block up to one has
    arrived verified (the medium's ``ready``), they join the next copy job, one
    of about :data:`STREAM_COPY_BYTES` on ``pool``'s thread, while the read
    goes on; the blocks still pending when the read ends are copied here. A
    block after one that was not delivered is never copied out (a partial load
    leaves the caller's rows past its run as they were). Returns once every
    copy has ended, also when the read raised (its error is re-raised then):
    no row is written after it returned. Returns the seconds from the read's
    end to the last copy's."""
    assert src.medium is not None
    assert dst.rows is not None
    assert then.dst.rows is not None
    assert pool is not None
    slots, out = dst.rows, then.dst.rows
    at = {slot: x for x, slot in enumerate(then.src.ids)}  # slot -> position in ``then``
    per_job = max(1, STREAM_COPY_BYTES // src.medium.block_bytes)
    pending: list[int] = []
    jobs: list[Future[None]] = []

    def copy(xs: list[int]) -> None:
        copy_rows(slots, [then.src.ids[x] for x in xs], out, [then.dst.ids[x] for x in xs])

    arrived = [False] * len(keys)
    upto = [0]  # blocks 0 .. upto-1 of the read have all arrived

    def ready(pos: int) -> None:
        arrived[pos] = True
        i = upto[0]
        while i < len(keys) and arrived[i]:
            x = at.get(dst.ids[i])
            if x is not None:
                pending.append(x)
            i += 1
        upto[0] = i
        if len(pending) >= per_job:
            xs = pending[:]
            pending.clear()
            executor = pool.executor()
            if executor is None:  # the cache is closing: copy here
                copy(xs)
            else:
                jobs.append(executor.submit(copy, xs))

    read: Any = src.medium.read_slots  # type: ignore[attr-defined]
    try:
        bad: list[int] = read(src.ids, row_buffers(slots, dst.ids), keys, ready)
        t0 = time.perf_counter()
        if pending and not bad:
            copy(pending)
    finally:
        wait(jobs)  # also when the read raised: no copy outlives this call
    check_read(src, bad, keys)
    for job in jobs:
        job.result()
    return time.perf_counter() - t0


class TierActor(Actor[TierRequest]):
    """The actor of one tier's medium; see the module docstring."""

    def __init__(
        self,
        medium: BlockMedium,
        *,
        threads: int = 2,
        mailbox_size: int = 64,
        inline_bytes: int = 4 * 2**20,
        copier: CopyPool | None = None,
        move_bytes: bool = True,
    ) -> None:
        super().__init__(medium.name, mailbox_size=mailbox_size, concurrency=threads)
        self.medium = medium
        # At most ``threads`` jobs at once, each in one of the tier's own threads.
        self.threads = Threads(f"kvactors-{medium.name}", threads)
        self.inline_bytes = inline_bytes
        self.copier = copier
        self.move_bytes = move_bytes
        self._jobs = 0
        self._failed_jobs = 0
        self._bytes_read = 0
        self._bytes_written = 0
        self._busy = 0.0
        self._ops: dict[str, list[float]] = {}
        self.crashed: str | None = None
        self._retry_at: float | None = None  # when a tier that is down is tried again

    async def handle(self, message: TierRequest) -> Any:
        if self.crashed is not None:
            wait = None if self._retry_at is None else self._retry_at - time.monotonic()
            if wait is None or wait > 0:
                down = TierFailed(f"tier {self.name!r} is down: {self.crashed}")
                down.retry_after = wait
                raise down
            self.crashed = self._retry_at = None  # try the medium again
        match message:
            case Move(src, dst, keys, then):
                op = f"{src.name}->{dst.name}"
                if not self.move_bytes:  # a metadata-only cache: the transfer is a no-op
                    return self._done(op, len(keys), 0.0)
                if then is not None:
                    return await self._fused(op, src, dst, keys, then)
                inline = self._inline(src, dst, len(keys))
                return await self._run(op, len(keys), inline, move, src, dst, keys, self.copier)
            case Forget(keys):
                await self._run("forget", 0, self.medium.in_memory, self.medium.drop, keys)
                return None
            case Contains(keys):
                # A shared medium (a remote store) answers for blocks other engines wrote.
                found: list[bool] = []
                contains = self.medium.contains  # type: ignore[attr-defined]
                await self._run("lookup", 0, False, lambda: found.extend(contains(keys)))
                return found

    async def _fused(self, op: str, src: Side, dst: Side, keys: list[Key], then: Move) -> JobReport:
        """A promotion and the load of the blocks it brings up, in one job (one
        thread hop): ``then`` runs once every block is in ``dst``, verified. Each
        part is counted as its own transfer."""
        copy = [0.0]

        def both() -> None:
            if self._streams(src, dst, then, len(keys)):
                copy[0] = _streamed(src, dst, keys, then, self.copier)
                return
            move(src, dst, keys, self.copier)
            t0 = time.perf_counter()
            move(then.src, then.dst, then.keys, self.copier)
            copy[0] = time.perf_counter() - t0

        report = await self._run(op, len(keys), self._inline(src, dst, len(keys)), both)
        self._count(op, 0, -copy[0], jobs=0)
        self._count(f"{then.src.name}->{then.dst.name}", len(then.keys), copy[0])
        return report

    def _streams(self, src: Side, dst: Side, then: Move, blocks: int) -> bool:
        """Whether a promotion's load copies its blocks out as they arrive
        (:func:`_streamed`): from a medium that says when each block is in,
        verified (``read_slots`` with ``ready``: a remote store), into host
        slots, out to host rows, at least twice :data:`STREAM_COPY_BYTES`, with
        a copy thread to do it, in blocks of at least :data:`STREAM_BLOCK_BYTES`."""
        s, d, out = src.medium, dst.rows, then.dst.rows
        return (
            getattr(s, "ready_reads", False)
            and dst.medium is not None
            and d is not None
            and d.is_cpu
            and then.src.rows is d
            and out is not None
            and out.is_cpu
            and self.medium.block_bytes >= STREAM_BLOCK_BYTES
            and blocks * self.medium.block_bytes >= 2 * STREAM_COPY_BYTES
            and self.copier is not None
            and self.copier.executor() is not None
        )

    def _inline(self, src: Side, dst: Side, blocks: int) -> bool:
        """Whether a transfer runs on the event loop: memory on the host at both
        ends (never a file) and at most ``inline_bytes``."""
        s, d = src.rows, dst.rows
        return (
            s is not None
            and d is not None
            and s.is_cpu
            and d.is_cpu
            and blocks * self.medium.block_bytes <= self.inline_bytes
        )

    async def _run(
        self, op: str, blocks: int, inline: bool, fn: Callable[..., object], *args: Any
    ) -> JobReport:
        """Run a job, inline or in one of the tier's worker threads."""
        try:
            if inline:
                t0 = time.perf_counter()
                fn(*args)
                spent = time.perf_counter() - t0
            else:
                spent = await self.threads.run(_timed, fn, args)
        except TierFailed as exc:
            self._failed_jobs += 1
            self.crashed = str(exc)
            if exc.retry_after is not None:
                self._retry_at = time.monotonic() + exc.retry_after
            raise
        except KVActorsError:
            self._failed_jobs += 1
            raise
        except Exception as exc:
            self._failed_jobs += 1
            raise TransferError(
                f"tier {self.name!r}: {op} of {blocks} blocks failed: {exc}"
            ) from exc
        return self._done(op, blocks, spent, not inline)

    def _done(self, op: str, blocks: int, seconds: float, threaded: bool = False) -> JobReport:
        self._jobs += 1
        self._busy += seconds
        nbytes = self._count(op, blocks, seconds)
        return JobReport(self.name, op, blocks, nbytes, seconds, threaded)

    def _count(self, op: str, blocks: int, seconds: float, jobs: int = 1) -> int:
        """Add a job moving ``blocks`` in ``seconds`` to transfer ``op``'s totals; its bytes."""
        nbytes = blocks * self.medium.block_bytes
        acc = self._ops.get(op)
        if acc is None:
            # jobs, bytes, seconds, and whether its bytes are written / read here
            written = op.endswith("->" + self.name)
            read = not written and op.startswith(self.name + "->")
            acc = self._ops[op] = [0, 0, 0.0, written, read]
        acc[0] += jobs
        acc[1] += nbytes
        acc[2] += seconds
        if acc[3]:
            self._bytes_written += nbytes
        elif acc[4]:
            self._bytes_read += nbytes
        return nbytes

    async def on_stop(self) -> None:
        self.threads.close()  # every job has ended: the messages in hand are done
        self.medium.close()

    def tier_stats(self) -> TierStats:
        return TierStats(
            name=self.name,
            jobs=self._jobs,
            failed_jobs=self._failed_jobs,
            bytes_read=self._bytes_read,
            bytes_written=self._bytes_written,
            busy_seconds=self._busy,
            transfers={
                op: OpStats(int(a[0]), int(a[1]), a[2]) for op, a in self._ops.items() if a[1]
            },
            crashed=self.crashed,
        )
