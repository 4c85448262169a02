"""A one-shot result slot: set once by whoever does the work, awaited by whoever asked."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

import anyio

T = TypeVar("T")

_PENDING, _DONE, _FAILED = 0, 1, 2


class Future(Generic[T]):
    """The reply of one request.

    Await it (``await fut`` or ``await fut.wait()``) from async code, or poll
    ``done()`` and then call ``result()`` once per scheduler step. Setting it a
    second time is ignored, so a late reply after a cancellation is harmless.
    Nobody awaiting a future is a normal event: its result is simply dropped.
    """

    __slots__ = ("_event", "_new_event", "_state", "_value")

    def __init__(self, new_event: Callable[[], anyio.Event] = anyio.Event) -> None:
        # The event is made only when someone waits before the result is set,
        # by ``new_event`` (actors pass their event loop's event class, which
        # skips looking up the async backend each time).
        self._new_event = new_event
        self._event: anyio.Event | None = None
        self._state = _PENDING
        self._value: Any = None

    def done(self) -> bool:
        """Whether a result or an error is set."""
        return self._state != _PENDING

    def result(self) -> T:
        """The result; raises the error set instead, or ``RuntimeError`` if not done yet."""
        if self._state == _DONE:
            return self._value  # type: ignore[no-any-return]
        if self._state == _FAILED:
            raise self._value
        raise RuntimeError("result() called on a future that is not done; poll done() first")

    def exception(self) -> BaseException | None:
        """The error set, ``None`` if a result was set; ``RuntimeError`` if not done yet."""
        if self._state == _PENDING:
            raise RuntimeError("exception() called on a future that is not done")
        return self._value if self._state == _FAILED else None

    def set_result(self, value: T) -> None:
        if self._state == _PENDING:
            self._state, self._value = _DONE, value
            if self._event is not None:
                self._event.set()

    def set_exception(self, error: BaseException) -> None:
        if self._state == _PENDING:
            self._state, self._value = _FAILED, error
            if self._event is not None:
                self._event.set()

    async def _settle(self) -> None:
        if self._event is None:
            self._event = self._new_event()
        await self._event.wait()

    async def wait(self) -> T:
        """Wait for the result and return it (or raise the error).

        Cancelling the waiter does not cancel the work: the result is dropped.
        """
        if self._state == _PENDING:
            await self._settle()
        return self.result()

    async def settled(self) -> None:
        """Wait until a result or an error is set, without raising either."""
        if self._state == _PENDING:
            await self._settle()

    def __await__(self) -> Generator[Any, None, T]:
        return self.wait().__await__()

    def __repr__(self) -> str:
        state = ("pending", "done", "failed")[self._state]
        return f"<Future {state}>"
