"""The actor runtime: ask/tell, backpressure, errors, start-up failures and shutdown."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest

from kvactors.actors import NOT_NOW, Actor, Future
from kvactors.errors import ActorClosed, ActorStartError

pytestmark = pytest.mark.anyio


class Add(msgspec.Struct, frozen=True, tag=True):
    n: int


class Boom(msgspec.Struct, frozen=True, tag=True):
    pass


class Park(msgspec.Struct, frozen=True, tag=True):
    """Wait until the test releases the actor."""


Msg = Add | Boom | Park


class Counter(Actor[Msg]):
    def __init__(self, **kw: Any) -> None:
        super().__init__("counter", **kw)
        self.total = 0
        self.release = anyio.Event()
        self.parked = anyio.Event()
        self.stopped = False

    async def handle(self, message: Msg) -> Any:
        match message:
            case Add(n):
                self.total += n
                return self.total
            case Boom():
                raise ValueError("boom")
            case Park():
                self.parked.set()
                await self.release.wait()
                return "released"

    async def on_stop(self) -> None:
        self.stopped = True


class FailsToStart(Actor[Msg]):
    async def on_start(self) -> None:
        raise OSError("no device")


async def test_ask_returns_the_reply_and_tell_is_handled_in_order() -> None:
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            actor = Counter()
            await tg.start(actor.run)
            assert await actor.ask(Add(2)) == 2
            await actor.tell(Add(3))
            assert await actor.ask(Add(0)) == 5
            assert actor.statistics().handled == 3
            await actor.stop()
    assert actor.stopped


async def test_handler_error_reaches_the_asker_and_the_actor_keeps_serving() -> None:
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            actor = Counter()
            await tg.start(actor.run)
            with pytest.raises(ValueError, match="boom"):
                await actor.ask(Boom())
            assert await actor.ask(Add(1)) == 1
            stats = actor.statistics()
            assert (stats.failed, stats.handled) == (1, 1)
            await actor.stop()


async def test_startup_error_reaches_the_starter() -> None:
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            actor = FailsToStart("broken")
            with pytest.raises(ActorStartError, match="no device"):
                await tg.start(actor.run)
    with pytest.raises(ActorClosed):
        await actor.ask(Add(1))


async def test_full_mailbox_applies_backpressure_and_drops_hints() -> None:
    """With the actor parked on one message and a mailbox of 2, two more fit;
    a third ask waits for room, and hints are dropped and counted."""
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            actor = Counter(mailbox_size=2)
            await tg.start(actor.run)
            parked = actor.ask_nowait(Park())
            await actor.parked.wait()
            first = actor.ask_nowait(Add(1))
            second = actor.ask_nowait(Add(1))
            assert actor.statistics().mailbox_depth == 2
            with pytest.raises(anyio.WouldBlock):
                actor.ask_nowait(Add(1))
            assert actor.try_tell(Add(100)) is False
            assert actor.statistics().hints_dropped == 1

            sent = anyio.Event()

            async def blocked_ask() -> None:
                await actor.ask(Add(10))
                sent.set()

            tg.start_soon(blocked_ask)
            await anyio.wait_all_tasks_blocked()
            assert not sent.is_set()  # waiting for room, not dropped
            actor.release.set()
            assert await parked == "released"
            assert (await first, await second) == (1, 2)
            await sent.wait()
            assert actor.total == 12
            await actor.stop()


async def test_stop_fails_queued_requests_and_later_sends() -> None:
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            actor = Counter(mailbox_size=4)
            await tg.start(actor.run)
            parked = actor.ask_nowait(Park())
            await actor.parked.wait()
            queued = [actor.ask_nowait(Add(1)) for _ in range(3)]
            await actor.stop()
            actor.release.set()
            assert await parked == "released"  # the message in hand finishes
            for fut in queued:
                with pytest.raises(ActorClosed, match="closed before handling"):
                    await fut
            with pytest.raises(ActorClosed):
                await actor.ask(Add(1))
            assert actor.try_tell(Add(1)) is False
    assert actor.total == 0
    assert actor.stopped


async def test_cancelling_the_task_group_fails_in_flight_and_queued_asks() -> None:
    with anyio.fail_after(5):
        actor = Counter(mailbox_size=4)
        async with anyio.create_task_group() as tg:
            await tg.start(actor.run)
            parked = actor.ask_nowait(Park())
            await actor.parked.wait()
            queued = actor.ask_nowait(Add(1))
            tg.cancel_scope.cancel()
        for fut in (parked, queued):
            assert fut.done()
            assert isinstance(fut.exception(), ActorClosed)
        assert actor.stopped


async def test_future_polling_contract() -> None:
    fut: Future[int] = Future()
    assert not fut.done()
    with pytest.raises(RuntimeError, match="not done"):
        fut.result()
    fut.set_result(3)
    fut.set_result(4)  # ignored: one-shot
    assert fut.done()
    assert fut.result() == 3
    assert await fut == 3
    failed: Future[int] = Future()
    failed.set_exception(KeyError("k"))
    with pytest.raises(KeyError):
        failed.result()


class Quick(Actor[Msg]):
    """Answers ``Add`` at once (``handle_now``); ``Park`` and ``Boom`` take the mailbox."""

    def __init__(self, **kw: Any) -> None:
        super().__init__("quick", **kw)
        self.total = 0
        self.release = anyio.Event()
        self.parked = anyio.Event()

    def handle_now(self, message: Msg) -> Any:
        match message:
            case Add(n):
                self.total += n
                return self.total
            case Boom():
                raise ValueError("boom now")
        return NOT_NOW

    async def handle(self, message: Msg) -> Any:
        if isinstance(message, Park):
            self.parked.set()
            await self.release.wait()
            return "released"
        return self.handle_now(message)


async def test_idle_actor_answers_an_ask_in_the_askers_task() -> None:
    """No mailbox round trip: the reply is there before anything else runs."""
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            actor = Quick()
            await tg.start(actor.run)
            assert await actor.ask(Add(2)) == 2
            assert actor.ask_now(Add(3)) == 5
            with pytest.raises(ValueError, match="boom now"):
                await actor.ask(Boom())
            stats = actor.statistics()
            assert (stats.handled, stats.failed, stats.handled_direct) == (2, 1, 3)
            assert stats.mailbox_depth == 0
            await actor.stop()
            assert actor.ask_now(Add(1)) is NOT_NOW
            with pytest.raises(ActorClosed):
                await actor.ask(Add(1))


async def test_a_busy_actor_keeps_mailbox_order_for_direct_capable_asks() -> None:
    """While a message is in hand or queued, asks go through the mailbox, so a
    tell sent earlier is handled before a later ask."""
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            actor = Quick(mailbox_size=4)
            await tg.start(actor.run)
            parked = actor.ask_nowait(Park())
            await actor.parked.wait()
            assert actor.ask_now(Add(1)) is NOT_NOW  # busy: nothing handled
            await actor.tell(Add(10))
            later = actor.ask_nowait(Add(1))
            assert actor.statistics().mailbox_depth == 2
            actor.release.set()
            assert await parked == "released"
            assert await later == 11
            assert actor.statistics().handled_direct == 0
            # Idle again: direct.
            assert await actor.ask(Add(1)) == 12
            assert actor.statistics().handled_direct == 1
            await actor.stop()


async def test_a_sender_cancelled_while_waiting_for_room_sends_nothing() -> None:
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            actor = Counter(mailbox_size=1)
            await tg.start(actor.run)
            parked = actor.ask_nowait(Park())
            await actor.parked.wait()
            queued = actor.ask_nowait(Add(1))
            with anyio.move_on_after(0.05):
                await actor.ask(Add(100))  # waits for room, then is cancelled
            actor.release.set()
            assert await parked == "released"
            assert await queued == 1
            assert await actor.ask(Add(0)) == 1  # the cancelled Add(100) never ran
            await actor.stop()
