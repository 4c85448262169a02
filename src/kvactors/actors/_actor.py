"""The actor runtime: a bounded mailbox of typed messages, served by one or more tasks.

An actor owns its state; nothing else touches it. Every message is a
:class:`Message` whose type parameter is its reply type, so ``await
actor.ask(message)`` is typed. Three send verbs:

- ``ask``: send and await the reply (waits for mailbox room: backpressure);
- ``tell``: send with no reply (waits for room too);
- ``try_tell``: a lossy hint, dropped and counted when the mailbox is full.

One path, two places it may run. An actor handles at most ``concurrency``
messages at once, in the order they were sent. An ``ask`` that finds the
actor running with a free place and nothing queued runs the handler in the
asker's task (no hand-off to a serving task and back); otherwise the
envelope waits in the mailbox for a serving task. It is the same handler
either way, and cancellation means the same either way: cancelling the asker
cancels the handler at its next await (in the mailbox case through the
envelope's cancel scope), and ``ask`` returns only once the handler has
finished. So a handler's ``finally`` always runs before its asker goes on.

Life cycle: ``await task_group.start(actor.run)`` returns once ``on_start`` has
succeeded (its error reaches the starter as :class:`ActorStartError`).
``await actor.stop()`` closes the mailbox: later sends raise
:class:`ActorClosed`, queued messages fail with it, the messages in hand
finish, ``on_stop`` runs, and the ``run`` task ends.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel
import msgspec
from anyio.abc import TaskStatus

from kvactors.actors._future import Future
from kvactors.errors import ActorClosed, ActorStartError

M = TypeVar("M")
R = TypeVar("R")

log = logging.getLogger("kvactors.actors")


Checkpoint = Callable[[], Awaitable[None]]


def loop_checkpoints() -> tuple[Checkpoint, Checkpoint]:
    """``(checkpoint, checkpoint_if_cancelled)`` of the running async backend: the
    functions ``anyio.lowlevel``'s run, looked up once instead of on each call
    (the look-up doubled a yield's cost here). Call it on the loop they serve."""
    get = getattr(anyio.lowlevel, "get_async_backend", None)
    if get is None:  # an anyio without it: its own functions
        return anyio.lowlevel.checkpoint, anyio.lowlevel.checkpoint_if_cancelled
    backend = get()
    return backend.checkpoint, backend.checkpoint_if_cancelled


class Message(msgspec.Struct, Generic[R], frozen=True):
    """Base of every message; ``R`` is the type of its reply (``None`` for tells)."""


class Envelope:
    """A message travelling through a mailbox, its reply slot (``None`` for a tell),
    and the cancel scope its handler runs under once a serving task takes it."""

    __slots__ = ("cancelled", "message", "reply", "scope")

    def __init__(self, message: Any, reply: Future[Any] | None) -> None:
        self.message = message
        self.reply = reply
        self.scope: anyio.CancelScope | None = None
        self.cancelled = False

    def cancel(self) -> None:
        """The asker gave up: skip the message if still queued, else cancel its handler."""
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()


class ActorStats(msgspec.Struct, frozen=True):
    """Counters of one actor. ``mailbox_depth`` is the number of queued messages,
    ``in_hand`` the number being handled (in serving tasks or askers' tasks)."""

    name: str
    mailbox_depth: int
    mailbox_size: int
    handled: int
    failed: int
    hints_dropped: int
    running: bool
    in_hand: int = 0


class Actor(Generic[M]):
    """Base class of every kvactors actor.

    Subclasses implement :meth:`handle` (one ``match`` over their message
    union, one case per message) and may override :meth:`on_start` /
    :meth:`on_stop`. State changes between awaits stay atomic: everything runs
    on one event loop thread.
    """

    def __init__(self, name: str, *, mailbox_size: int = 64, concurrency: int = 1) -> None:
        if mailbox_size < 1:
            raise ValueError(f"{name}: mailbox_size must be >= 1, got {mailbox_size}")
        if concurrency < 1:
            raise ValueError(f"{name}: concurrency must be >= 1, got {concurrency}")
        self.name = name
        self._mailbox_size = mailbox_size
        self._concurrency = concurrency
        self._queue: deque[Envelope] = deque()
        self._waiting: deque[anyio.Event] = deque()  # serving tasks waiting for work
        self._in_hand = 0  # messages being handled, in any task
        self._closing = False
        self._running = False
        # Places free to askers: ``concurrency`` while running and open, else 0.
        self._places = 0
        self._stopped = anyio.Event()
        # The running backend's event class: made directly, an event skips the
        # backend look-up of ``anyio.Event()``.
        self._new_event: Callable[[], anyio.Event] = type(self._stopped)
        self._drained: anyio.Event | None = None  # set when the last message in hand ends
        self._room: anyio.Event | None = None  # set when a message leaves a full mailbox
        self._handled = 0
        self._failed = 0
        self._dropped = 0
        self._checkpoint: Checkpoint = anyio.lowlevel.checkpoint  # the backend's, once running

    # -- to override ---------------------------------------------------------------

    async def handle(self, message: M) -> Any:
        """Handle one message; the return value is the asker's reply."""
        raise NotImplementedError

    async def on_start(self) -> None:
        """Acquire resources; an error here fails ``run`` before it reports ready."""

    async def on_stop(self) -> None:
        """Release resources; runs shielded, after the last message in hand ended."""

    # -- sending -------------------------------------------------------------------

    async def ask(self, message: Message[R]) -> R:
        """Send ``message`` and await its reply (or the handler's error).

        Raises :class:`ActorClosed` if the actor is closed. If the caller is
        cancelled, the handler is cancelled at its next await and this returns
        (raising the cancellation) only once the handler has ended.
        """
        if self._in_hand < self._places and not self._queue:  # ``idle``, written out
            # In the asker's task (written out here: one coroutine frame fewer).
            self._in_hand += 1
            try:
                result = await self.handle(message)  # type: ignore[arg-type]
            except Exception:
                self._failed += 1
                raise
            finally:
                self._in_hand -= 1
                if self._queue or self._drained is not None:
                    self._released()
            self._handled += 1
            return result  # type: ignore[no-any-return]
        envelope = Envelope(message, Future(self._new_event))
        await self._post(envelope)
        reply = envelope.reply
        assert reply is not None
        try:
            return await reply.wait()  # type: ignore[no-any-return]
        except BaseException:
            if not reply.done():
                envelope.cancel()
                with anyio.CancelScope(shield=True):
                    await reply.settled()
            raise

    async def tell(self, message: Message[None]) -> None:
        """Send ``message`` with no reply; waits for mailbox room."""
        await self._post(Envelope(message, None))

    def try_tell(self, message: Message[None]) -> bool:
        """Send a lossy hint: ``False`` (and counted as dropped) when the mailbox is
        full or the actor is closed. Never waits."""
        try:
            self._post_nowait(Envelope(message, None))
        except (anyio.WouldBlock, ActorClosed):
            self._dropped += 1
            return False
        return True

    async def _post(self, envelope: Envelope) -> None:
        while True:
            try:
                self._post_nowait(envelope)
                return
            except anyio.WouldBlock:
                # Full: wait until a serving task takes a message. Cancelled
                # here, nothing was sent.
                if self._room is None:
                    self._room = self._new_event()
                await self._room.wait()

    def _post_nowait(self, envelope: Envelope) -> None:
        if self._closing:
            raise ActorClosed(f"actor {self.name!r} is closed")
        if len(self._queue) >= self._mailbox_size:
            raise anyio.WouldBlock
        self._queue.append(envelope)
        self._wake()

    def _wake(self) -> None:
        # A serving task takes the next envelope when there is one and a place.
        if self._waiting and self._queue and self._in_hand < self._concurrency:
            self._waiting.popleft().set()

    def _ended(self) -> None:
        self._in_hand -= 1
        self._released()

    def _released(self) -> None:
        # A place came free: the stop waiting for the last message, or a queued one.
        if self._in_hand == 0 and self._drained is not None:
            self._drained.set()
        self._wake()

    # -- life cycle ----------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve the mailbox until :meth:`stop`; start it with ``task_group.start``."""
        try:
            await self.on_start()
        except Exception as exc:
            self._close()
            self._stopped.set()
            raise ActorStartError(f"actor {self.name!r} failed to start: {exc}") from exc
        self._running = True
        self._places = self._concurrency
        self._checkpoint = loop_checkpoints()[0]
        task_status.started()
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(self._concurrency):
                    tg.start_soon(self._serve)
        finally:
            self._running = False
            self._places = 0
            self._close()
            with anyio.CancelScope(shield=True):
                # Messages handled in their askers' tasks end before on_stop.
                if self._in_hand:
                    self._drained = self._new_event()
                    await self._drained.wait()
                try:
                    await self.on_stop()
                except Exception:
                    log.exception("actor %r: on_stop failed", self.name)
            self._stopped.set()

    async def _serve(self) -> None:
        try:
            while not self._closing:
                if not self._queue or self._in_hand >= self._concurrency:
                    wake = self._new_event()
                    self._waiting.append(wake)
                    try:
                        await wake.wait()
                    finally:
                        if not wake.is_set():  # cancelled: no longer waiting
                            self._waiting.remove(wake)
                    continue
                envelope = self._queue.popleft()
                self._took()
                if envelope.cancelled:
                    assert envelope.reply is not None
                    envelope.reply.set_exception(ActorClosed("the asker was cancelled"))
                    continue
                await self._dispatch(envelope)
                # Yield between messages: fairness, and a place to be cancelled.
                await self._checkpoint()
        finally:
            self._fail_queued()

    async def _dispatch(self, envelope: Envelope) -> None:
        reply = envelope.reply
        self._in_hand += 1
        try:
            with anyio.CancelScope() as scope:
                envelope.scope = scope
                result = await self.handle(envelope.message)
            if scope.cancelled_caught:
                # Cancelled by its asker, who raises its own cancellation.
                raise ActorClosed(f"actor {self.name!r}: the request was cancelled")
        except Exception as exc:
            self._failed += 1
            if reply is not None:
                reply.set_exception(exc)
            else:
                # A tell has nobody to tell; the error is counted and logged.
                log.error("actor %r: %s failed: %r", self.name, type(envelope.message), exc)
            return
        except BaseException:
            # Cancelled mid-message (the task group is going down): the asker
            # must not wait forever.
            if reply is not None:
                reply.set_exception(ActorClosed(f"actor {self.name!r} stopped mid-request"))
            raise
        finally:
            self._ended()
        self._handled += 1
        if reply is not None:
            reply.set_result(result)

    def _took(self) -> None:
        # A message left the mailbox: senders waiting for room try again.
        room = self._room
        if room is not None:
            self._room = None
            room.set()

    def _fail_queued(self) -> None:
        while self._queue:
            envelope = self._queue.popleft()
            if envelope.reply is not None:
                envelope.reply.set_exception(
                    ActorClosed(f"actor {self.name!r} closed before handling the request")
                )

    def _close(self) -> None:
        # Later sends raise ActorClosed; waiting serving tasks and senders wake to see it.
        self._closing = True
        self._places = 0
        while self._waiting:
            self._waiting.popleft().set()
        self._took()

    async def stop(self) -> None:
        """Close the mailbox. Messages in hand finish; queued ones fail with
        :class:`ActorClosed`; later sends raise it. Returns at once; the ``run``
        task ends when the messages in hand are done."""
        self._close()
        self._fail_queued()
        await anyio.lowlevel.checkpoint()

    async def wait_stopped(self) -> None:
        """Wait until ``run`` has finished (after :meth:`stop`, or cancellation)."""
        await self._stopped.wait()

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def idle(self) -> bool:
        """Whether an ``ask`` now is handled in the asker's task: the actor runs,
        has a free place and nothing queued."""
        return self._in_hand < self._places and not self._queue

    def statistics(self) -> ActorStats:
        return ActorStats(
            name=self.name,
            mailbox_depth=len(self._queue),
            mailbox_size=self._mailbox_size,
            handled=self._handled,
            failed=self._failed,
            hints_dropped=self._dropped,
            running=self._running,
            in_hand=self._in_hand,
        )
