"""How a ``kvactors`` command stops on a SIGTERM: the way Ctrl-C stops it.

Python's default for SIGTERM ends the process at once, with no ``finally``
block run, so a command stopped that way (by a service manager, a job
scheduler, ``kill``, ``timeout``) would leave behind the throwaway server,
the child processes and the temporary directories it started. While
:func:`sigterm_as_interrupt` is in force (:func:`kvactors.cli.main` runs every
command inside it), a SIGTERM instead:

- in an event loop started by :func:`run_async` (every command's
  ``anyio.run``), cancels the loop's main task, as asyncio's own Ctrl-C
  handler does, so every ``async with`` and ``finally`` of the command runs
  its clean-up; :func:`run_async` then raises :exc:`KeyboardInterrupt`;
- anywhere else, raises :exc:`KeyboardInterrupt` where the main thread is.

Either way the command's Ctrl-C clean-up runs and :func:`kvactors.cli.main`
returns 143 instead of 130. A second SIGTERM while that clean-up runs is
ignored (Ctrl-C still interrupts it).
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TypeVar

import anyio

__all__ = ["run_async", "sigterm_as_interrupt", "terminating"]

T = TypeVar("T")

_received: list[bool] = []
"""``[True]`` once a SIGTERM arrived while :func:`sigterm_as_interrupt` was in force."""

_main_tasks: list[tuple[asyncio.AbstractEventLoop, asyncio.Task[object]]] = []
"""The event loop and main task of the :func:`run_async` calls running now (innermost last)."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    if _received:
        return  # the first one's clean-up is running
    _received.append(True)
    if _main_tasks:
        loop, task = _main_tasks[-1]
        loop.call_soon_threadsafe(task.cancel)  # and wakes the loop if it is waiting
        return
    raise KeyboardInterrupt


def terminating() -> bool:
    """Whether a SIGTERM has arrived while :func:`sigterm_as_interrupt` is in force."""
    return bool(_received)


@contextmanager
def sigterm_as_interrupt() -> Iterator[list[bool]]:
    """A SIGTERM stops the code in the block as Ctrl-C does (see the module's
    docstring); the list it yields is ``[True]`` once one arrived. Outside the
    main thread (where no signal handler can be set) it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    _received.clear()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield _received
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_async(func: Callable[..., Awaitable[T]], *args: object) -> T:
    """``anyio.run(func, *args)``, cancelled by a SIGTERM (then
    :exc:`KeyboardInterrupt`, once the cancelled code's clean-up has run)."""

    async def main() -> T:
        task = asyncio.current_task()
        assert task is not None
        _main_tasks.append((asyncio.get_running_loop(), task))
        try:
            return await func(*args)
        finally:
            _main_tasks.pop()

    if _received:  # stopping already: start nothing more
        raise KeyboardInterrupt
    try:
        return anyio.run(main)
    except BaseException:
        if _received:
            raise KeyboardInterrupt from None
        raise
