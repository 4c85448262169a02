"""The actor runtime: a bounded mailbox of envelopes served by one or more tasks.

An actor owns its state; nothing else touches it. Callers ``ask`` (send an
envelope carrying the message and a one-shot :class:`Future`, then await the
future) or ``tell`` (no reply). Hints go through ``try_tell``, which drops the
message and counts it when the mailbox is full instead of waiting.

Life cycle: ``await task_group.start(actor.run)`` returns once ``on_start`` has
succeeded (its error reaches the starter as :class:`ActorStartError`).
``await actor.stop()`` closes the mailbox: the message being handled finishes,
messages still queued fail with :class:`ActorClosed`, ``on_stop`` runs, and the
``run`` task ends, so nothing outlives the caller's task group.

Direct asks: an actor whose handler can answer a message without awaiting
(:meth:`Actor.handle_now`) serves an ``ask`` in the asker's task when it is
idle, that is running with nothing posted and not yet finished. Nothing is
overtaken and nothing interleaves (a synchronous handler runs to completion on
the one event loop thread), so the actor still handles one message after the
other in the order sent; the two task switches of a mailbox round trip are
saved. Under contention, and for every ``tell`` / ``post``, the mailbox is used.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel
import msgspec
from anyio.abc import TaskStatus

from kvactors.actors._future import Future
from kvactors.errors import ActorClosed, ActorStartError

M = TypeVar("M")

log = logging.getLogger("kvactors.actors")


class _NotNow:
    """The type of :data:`NOT_NOW`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NOT_NOW"


NOT_NOW: Any = _NotNow()
"""What :meth:`Actor.handle_now` returns for a message that needs the mailbox path."""


class Envelope(Generic[M]):
    """A message and the reply slot travelling beside it (``None`` for a tell)."""

    __slots__ = ("message", "reply")

    def __init__(self, message: M, reply: Future[Any] | None) -> None:
        self.message = message
        self.reply = reply


class ActorStats(msgspec.Struct, frozen=True):
    """Counters of one actor. ``mailbox_depth`` is the number of queued messages."""

    name: str
    mailbox_depth: int
    mailbox_size: int
    handled: int
    failed: int
    hints_dropped: int
    running: bool
    handled_direct: int = 0
    """Of ``handled`` and ``failed``, the asks served in the asker's task (idle actor)."""


class Actor(Generic[M]):
    """Base class of every kvactors actor.

    Subclasses implement :meth:`handle` with a ``match`` over their message
    union and may override :meth:`on_start` / :meth:`on_stop`. With
    ``concurrency > 1`` that many messages are handled at once (tier actors use
    this to keep several transfers in flight); state changes between awaits
    stay atomic because everything runs on one event loop thread.
    """

    def __init__(self, name: str, *, mailbox_size: int = 64, concurrency: int = 1) -> None:
        if mailbox_size < 1:
            raise ValueError(f"{name}: mailbox_size must be >= 1, got {mailbox_size}")
        if concurrency < 1:
            raise ValueError(f"{name}: concurrency must be >= 1, got {concurrency}")
        self.name = name
        self._mailbox_size = mailbox_size
        self._concurrency = concurrency
        # The mailbox: queued envelopes (at most ``mailbox_size``), and the serving
        # tasks waiting for one, each woken by its own event.
        self._queue: deque[Envelope[M]] = deque()
        self._idle: deque[anyio.Event] = deque()
        self._looking = 0  # serving tasks that will check the queue without a wake-up
        self._closing = False
        self._running = False
        self._stopped = anyio.Event()
        # The running backend's event class: made directly, an event skips the
        # backend look-up of ``anyio.Event()`` (one or two per message).
        self._new_event: Callable[[], anyio.Event] = type(self._stopped)
        self._handled = 0
        self._failed = 0
        self._dropped = 0
        self._direct = 0
        # Messages posted and not yet handled (or failed). Zero means idle: no
        # message queued, handed to a serving task, or in hand.
        self._pending = 0
        self._room: anyio.Event | None = None  # set when a message leaves a full mailbox

    # -- to override ---------------------------------------------------------------

    async def handle(self, message: M) -> Any:
        """Handle one message; the return value is the asker's reply."""
        raise NotImplementedError

    def handle_now(self, message: M) -> Any:
        """Handle ``message`` without awaiting, or return :data:`NOT_NOW`.

        Called by :meth:`ask` in the asker's task, only while the actor is idle
        (running, nothing posted and unfinished); the return value is the reply
        and an error raised here reaches the asker. It must not await or block
        for long. The default defers every message to the mailbox.
        """
        return NOT_NOW

    async def on_start(self) -> None:
        """Acquire resources; an error here fails ``run`` before it reports ready."""

    async def on_stop(self) -> None:
        """Release resources; runs shielded from cancellation after the last message."""

    # -- sending -------------------------------------------------------------------

    async def ask(self, message: M) -> Any:
        """Send ``message`` and await the reply.

        Waits for mailbox room (backpressure). Raises :class:`ActorClosed` if
        the actor is closed, or whatever the handler raised. If the caller is
        cancelled the message may still be handled; its reply is dropped.
        An idle actor that can answer at once does so in the caller's task
        (:meth:`ask_now`): that ask neither waits nor is a cancellation point.
        """
        result = self.ask_now(message)
        if result is not NOT_NOW:
            return result
        reply: Future[Any] = Future(self._new_event)
        await self._post(Envelope(message, reply))
        return await reply.wait()

    def ask_now(self, message: M) -> Any:
        """The reply to ``message`` if the actor is idle (running, nothing posted
        and unfinished) and :meth:`handle_now` answers it; else :data:`NOT_NOW`,
        and nothing was sent. Never waits; raises what the handler raised."""
        if not self.idle:
            return NOT_NOW
        # In hand now: an ask made from inside the handler goes to the mailbox.
        self._pending += 1
        try:
            result = self.handle_now(message)
        except Exception:
            self._failed += 1
            self._direct += 1
            raise
        finally:
            self._pending -= 1
        if result is not NOT_NOW:
            self._handled += 1
            self._direct += 1
        return result

    async def post(self, message: M) -> Future[Any]:
        """Send ``message`` (waiting for mailbox room) and return its reply future."""
        reply: Future[Any] = Future(self._new_event)
        await self._post(Envelope(message, reply))
        return reply

    def ask_nowait(self, message: M) -> Future[Any]:
        """Post ``message`` without waiting; raises ``anyio.WouldBlock`` when full."""
        reply: Future[Any] = Future(self._new_event)
        self._post_nowait(Envelope(message, reply))
        return reply

    async def tell(self, message: M) -> None:
        """Send ``message`` with no reply; waits for mailbox room."""
        await self._post(Envelope(message, None))

    def try_tell(self, message: M) -> bool:
        """Send a lossy hint: ``False`` (and counted as dropped) when the mailbox is
        full or the actor is closed. Never waits."""
        try:
            self._post_nowait(Envelope(message, None))
        except (anyio.WouldBlock, ActorClosed):
            self._dropped += 1
            return False
        return True

    async def _post(self, envelope: Envelope[M]) -> None:
        while True:
            try:
                # With room in the mailbox, post without a scheduling round; the
                # caller awaits its reply next anyway.
                self._post_nowait(envelope)
                return
            except anyio.WouldBlock:
                # Full: wait until a serving task takes a message (backpressure).
                # Cancelled here, nothing was sent.
                if self._room is None:
                    self._room = self._new_event()
                await self._room.wait()

    def _post_nowait(self, envelope: Envelope[M]) -> None:
        if self._closing:
            raise ActorClosed(f"actor {self.name!r} is closed")
        if len(self._queue) >= self._mailbox_size:
            raise anyio.WouldBlock
        self._queue.append(envelope)
        self._pending += 1
        # Wake an idle serving task unless one about to look will take it.
        if self._idle and len(self._queue) > self._looking:
            self._idle.popleft().set()

    def _took(self) -> None:
        # A message left the mailbox: senders waiting for room try again.
        room = self._room
        if room is not None:
            self._room = None
            room.set()

    # -- life cycle ----------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve the mailbox until :meth:`stop`; start it with ``task_group.start``."""
        try:
            await self.on_start()
        except Exception as exc:
            self._close()
            self._fail_queued()
            self._stopped.set()
            raise ActorStartError(f"actor {self.name!r} failed to start: {exc}") from exc
        self._running = True
        task_status.started()
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(self._concurrency):
                    tg.start_soon(self._serve)
        finally:
            self._running = False
            self._close()
            self._fail_queued()
            with anyio.CancelScope(shield=True):
                try:
                    await self.on_stop()
                except Exception:
                    log.exception("actor %r: on_stop failed", self.name)
            self._stopped.set()

    async def _serve(self) -> None:
        queue = self._queue
        try:
            batch = 0
            while not self._closing:
                if not queue:
                    if batch:
                        # Just replied: the asker runs in the next loop round and
                        # often posts again at once. One scheduling round here
                        # finds that message queued, with no wake-up to pay.
                        batch = 0
                        self._looking += 1
                        try:
                            await anyio.lowlevel.checkpoint()
                        finally:
                            self._looking -= 1
                        continue
                    # Empty: wait to be woken by the next post (or by ``stop``).
                    wake = self._new_event()
                    self._idle.append(wake)
                    try:
                        await wake.wait()
                    finally:
                        if not wake.is_set():  # cancelled: no longer waiting
                            self._idle.remove(wake)
                    continue
                # Take what is queued without a scheduling round each; yield to
                # the loop every 16 messages for fairness and cancellation.
                if batch >= 16:
                    batch = 0
                    await anyio.lowlevel.checkpoint()
                    continue
                batch += 1
                envelope = queue.popleft()
                self._took()
                await self._dispatch(envelope)
        finally:
            # Cancelled or closed: whatever is still queued fails, never hangs.
            self._fail_queued()

    async def _dispatch(self, envelope: Envelope[M]) -> None:
        reply = envelope.reply
        try:
            result = await self.handle(envelope.message)
        except Exception as exc:
            self._pending -= 1
            self._failed += 1
            if reply is not None:
                reply.set_exception(exc)
            else:
                # A tell has nobody to tell; the error is counted and logged.
                log.error("actor %r: %s failed: %r", self.name, type(envelope.message), exc)
            return
        except BaseException:
            self._pending -= 1
            # Cancelled mid-message (the task group is going down): the asker
            # must not wait forever.
            if reply is not None:
                reply.set_exception(ActorClosed(f"actor {self.name!r} stopped mid-request"))
            raise
        self._pending -= 1
        self._handled += 1
        if reply is not None:
            reply.set_result(result)

    def _fail(self, envelope: Envelope[M]) -> None:
        self._pending -= 1
        if envelope.reply is not None:
            envelope.reply.set_exception(
                ActorClosed(f"actor {self.name!r} closed before handling the request")
            )

    def _fail_queued(self) -> None:
        while self._queue:
            self._fail(self._queue.popleft())

    def _close(self) -> None:
        # Later sends raise ActorClosed; idle serving tasks and senders waiting
        # for room wake up to see it.
        self._closing = True
        while self._idle:
            self._idle.popleft().set()
        self._took()

    async def stop(self) -> None:
        """Close the mailbox. The message in hand finishes; queued ones fail with
        :class:`ActorClosed`; later sends raise it. Returns at once; the ``run``
        task ends when the message in hand is done."""
        self._close()
        await anyio.lowlevel.checkpoint()

    async def wait_stopped(self) -> None:
        """Wait until ``run`` has finished (after :meth:`stop`, or cancellation)."""
        await self._stopped.wait()

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def idle(self) -> bool:
        """Running and open with nothing posted and unfinished: an ``ask`` now is
        answered in the asker's task if :meth:`handle_now` can answer it."""
        return not self._pending and self._running and not self._closing

    def statistics(self) -> ActorStats:
        return ActorStats(
            name=self.name,
            mailbox_depth=len(self._queue),
            mailbox_size=self._mailbox_size,
            handled=self._handled,
            failed=self._failed,
            hints_dropped=self._dropped,
            running=self._running,
            handled_direct=self._direct,
        )
