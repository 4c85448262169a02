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
"""

from __future__ import annotations

import logging
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel
import msgspec
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream

from kvactors.actors._future import Future
from kvactors.errors import ActorClosed, ActorStartError

M = TypeVar("M")

log = logging.getLogger("kvactors.actors")


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
        self._send, self._recv = anyio.create_memory_object_stream[Envelope[M]](mailbox_size)
        self._closing = False
        self._running = False
        self._stopped = anyio.Event()
        self._handled = 0
        self._failed = 0
        self._dropped = 0

    # -- to override ---------------------------------------------------------------

    async def handle(self, message: M) -> Any:
        """Handle one message; the return value is the asker's reply."""
        raise NotImplementedError

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
        """
        reply: Future[Any] = Future()
        await self._post(Envelope(message, reply))
        return await reply.wait()

    async def post(self, message: M) -> Future[Any]:
        """Send ``message`` (waiting for mailbox room) and return its reply future."""
        reply: Future[Any] = Future()
        await self._post(Envelope(message, reply))
        return reply

    def ask_nowait(self, message: M) -> Future[Any]:
        """Post ``message`` without waiting; raises ``anyio.WouldBlock`` when full."""
        reply: Future[Any] = Future()
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
        if self._closing:
            raise ActorClosed(f"actor {self.name!r} is closed")
        try:
            try:
                # With room in the mailbox, post without the scheduling round
                # that ``send`` starts with; the caller awaits its reply next
                # anyway. Only a full mailbox waits (backpressure).
                self._send.send_nowait(envelope)
            except anyio.WouldBlock:
                await self._send.send(envelope)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise ActorClosed(f"actor {self.name!r} is closed") from None

    def _post_nowait(self, envelope: Envelope[M]) -> None:
        if self._closing:
            raise ActorClosed(f"actor {self.name!r} is closed")
        try:
            self._send.send_nowait(envelope)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise ActorClosed(f"actor {self.name!r} is closed") from None

    # -- life cycle ----------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve the mailbox until :meth:`stop`; start it with ``task_group.start``."""
        try:
            await self.on_start()
        except Exception as exc:
            self._closing = True
            self._send.close()
            self._recv.close()
            self._stopped.set()
            raise ActorStartError(f"actor {self.name!r} failed to start: {exc}") from exc
        self._running = True
        task_status.started()
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(self._concurrency):
                    tg.start_soon(self._serve, self._recv.clone())
                # The clones keep the mailbox open; this handle is no longer needed.
                self._recv.close()
        finally:
            self._running = False
            self._closing = True
            self._send.close()
            with anyio.CancelScope(shield=True):
                try:
                    await self.on_stop()
                except Exception:
                    log.exception("actor %r: on_stop failed", self.name)
            self._stopped.set()

    async def _serve(self, recv: MemoryObjectReceiveStream[Envelope[M]]) -> None:
        async with recv:
            try:
                batch = 0
                while True:
                    try:
                        # Take what is queued without a scheduling round each;
                        # yield to the loop every 16 messages for fairness and
                        # cancellation, and wait only when the mailbox is empty.
                        if batch >= 16:
                            batch = 0
                            await anyio.lowlevel.checkpoint()
                        envelope = recv.receive_nowait()
                        batch += 1
                    except anyio.WouldBlock:
                        batch = 0
                        try:
                            envelope = await recv.receive()
                        except anyio.EndOfStream:
                            break
                    except anyio.EndOfStream:
                        break
                    if self._closing:
                        self._fail(envelope)
                        continue
                    await self._dispatch(envelope)
            finally:
                # Cancelled or closed: whatever is still queued fails, never hangs.
                while True:
                    try:
                        self._fail(recv.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                        break

    async def _dispatch(self, envelope: Envelope[M]) -> None:
        reply = envelope.reply
        try:
            result = await self.handle(envelope.message)
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
        self._handled += 1
        if reply is not None:
            reply.set_result(result)

    def _fail(self, envelope: Envelope[M]) -> None:
        if envelope.reply is not None:
            envelope.reply.set_exception(
                ActorClosed(f"actor {self.name!r} closed before handling the request")
            )

    async def stop(self) -> None:
        """Close the mailbox. The message in hand finishes; queued ones fail with
        :class:`ActorClosed`; later sends raise it. Returns at once; the ``run``
        task ends when the message in hand is done."""
        self._closing = True
        self._send.close()
        await anyio.lowlevel.checkpoint()

    async def wait_stopped(self) -> None:
        """Wait until ``run`` has finished (after :meth:`stop`, or cancellation)."""
        await self._stopped.wait()

    @property
    def closed(self) -> bool:
        return self._closing

    def statistics(self) -> ActorStats:
        stats = self._send.statistics()
        return ActorStats(
            name=self.name,
            mailbox_depth=stats.current_buffer_used,
            mailbox_size=self._mailbox_size,
            handled=self._handled,
            failed=self._failed,
            hints_dropped=self._dropped,
            running=self._running,
        )
