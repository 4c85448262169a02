"""Cache events as seen from outside: stored, removed, promoted, demoted, per tier."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectSendStream

from kvactors.keys import Key

__all__ = ["CacheEvent", "EventHub"]

EventKind = Literal["stored", "removed", "promoted", "demoted", "corrupted", "missing"]


class CacheEvent(msgspec.Struct, frozen=True):
    """``keys`` changed state in ``tier``.

    - ``stored``: became ready in ``tier``; ``removed``: left ``tier``.
    - ``promoted``: copied up from NVMe into ``tier`` (``"cpu"``);
      ``demoted``: written down into ``tier`` (``"nvme"``) when evicted above.
    - ``corrupted``: failed an integrity check in ``tier`` and was dropped.
    - ``missing``: no longer held by the shared tier ``tier`` when read (its
      server evicted it, or it expired) and was dropped: a miss, not damage.
    """

    kind: EventKind
    tier: str
    keys: list[Key]


class EventHub:
    """Fans events out to subscribers, each with its own bounded buffer.

    Publishing never waits: a subscriber that falls ``buffer`` events behind
    loses the newest ones, counted in ``dropped``. Owned by the policy actor.
    """

    def __init__(self, buffer: int) -> None:
        self._buffer = buffer
        self._subscribers: list[MemoryObjectSendStream[CacheEvent]] = []
        self.published = 0
        self.dropped = 0

    def publish(self, event: CacheEvent) -> None:
        self.published += 1
        alive: list[MemoryObjectSendStream[CacheEvent]] = []
        for sub in self._subscribers:
            try:
                sub.send_nowait(event)
            except anyio.WouldBlock:
                self.dropped += 1
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                sub.close()  # the subscriber went away
                continue
            alive.append(sub)
        self._subscribers = alive

    def published_unseen(self, n: int) -> None:
        """Count ``n`` events published while nobody subscribes: nothing to build or send."""
        assert not self._subscribers, "a subscriber would miss these events"
        self.published += n

    def subscribe(self) -> AsyncIterator[CacheEvent]:
        """A new receive stream of events from now on; iterate it with ``async for``.

        It ends when the cache closes. Close it early with ``aclose()``.
        """
        send, recv = anyio.create_memory_object_stream[CacheEvent](self._buffer)
        self._subscribers.append(send)
        return recv

    def close(self) -> None:
        for sub in self._subscribers:
            sub.close()
        self._subscribers = []

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
