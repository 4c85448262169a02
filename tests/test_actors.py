"""The actor runtime: ask/tell/try_tell, where a message runs, backpressure,
cancellation, errors, start-up failures and shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from kvactors.actors import Actor, Future, Message
from kvactors.errors import ActorClosed, ActorStartError

pytestmark = pytest.mark.anyio


class Add(Message[int], frozen=True, tag=True):
    n: int


class Boom(Message[None], frozen=True, tag=True):
    pass


class Park(Message[str], frozen=True, tag=True):
    """Wait until the test releases the actor."""


class WhoRuns(Message[object], frozen=True, tag=True):
    """Reply with the task the handler runs in."""


Msg = Add | Boom | Park | WhoRuns


class Counter(Actor[Msg]):
    def __init__(self, **kw: Any) -> None:
        super().__init__("counter", **kw)
        self.total = 0
        self.release = anyio.Event()
        self.parked = anyio.Event()
        self.in_hand = 0
        self.most_in_hand = 0
        self.finished: list[str] = []
        self.stopped = False

    async def handle(self, message: Msg) -> Any:
        self.in_hand += 1
        self.most_in_hand = max(self.most_in_hand, self.in_hand)
        try:
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
                case WhoRuns():
                    return anyio.get_current_task().id
        finally:
            self.in_hand -= 1
            self.finished.append(type(message).__name__)

    async def on_stop(self) -> None:
        self.stopped = True


class FailsToStart(Actor[Msg]):
    async def on_start(self) -> None:
        raise OSError("no device")


@asynccontextmanager
async def started(**kw: Any) -> AsyncIterator[tuple[Counter, anyio.abc.TaskGroup]]:
    """A running ``Counter(**kw)`` and the task group serving it, within 5 s;
    stopped on the way out (the group then waits for its ``run`` to end)."""
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            actor = Counter(**kw)
            await tg.start(actor.run)
            try:
                yield actor, tg
            finally:
                await actor.stop()


def submit(tg: anyio.abc.TaskGroup, actor: Counter, message: Any) -> Future[Any]:
    """Ask ``message`` from a new task of ``tg``; the reply (or error) in a future."""
    fut: Future[Any] = Future()

    async def run() -> None:
        try:
            fut.set_result(await actor.ask(message))
        except Exception as exc:
            fut.set_exception(exc)

    tg.start_soon(run)
    return fut


async def park(actor: Counter, tg: anyio.abc.TaskGroup) -> Future[str]:
    """Ask ``Park`` from a task of ``tg`` and wait until the actor holds it."""
    fut: Future[str] = submit(tg, actor, Park())
    await actor.parked.wait()
    return fut


async def test_ask_returns_the_typed_reply_and_tell_is_handled_in_order() -> None:
    async with started() as (actor, _):
        total: int = await actor.ask(Add(2))
        assert total == 2
        await actor.tell(Add(3))  # type: ignore[arg-type]
        assert await actor.ask(Add(0)) == 5
        assert actor.statistics().handled == 3
    assert actor.stopped


async def test_handler_error_reaches_the_asker_and_the_actor_keeps_serving() -> None:
    async with started() as (actor, _):
        with pytest.raises(ValueError, match="boom"):
            await actor.ask(Boom())
        assert await actor.ask(Add(1)) == 1
        stats = actor.statistics()
        assert (stats.failed, stats.handled) == (1, 1)


async def test_startup_error_reaches_the_starter() -> None:
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            actor = FailsToStart("broken")
            with pytest.raises(ActorStartError, match="no device"):
                await tg.start(actor.run)
    with pytest.raises(ActorClosed):
        await actor.ask(Add(1))


async def test_an_idle_actor_runs_an_ask_in_the_askers_task_a_busy_one_by_mailbox() -> None:
    """Same handler, two places: the asker's task when the actor has a free
    place and nothing queued, a serving task otherwise; order is kept."""
    async with started(mailbox_size=4) as (actor, tg):
        assert await actor.ask(WhoRuns()) == anyio.get_current_task().id
        parked = await park(actor, tg)
        await actor.tell(Add(10))  # type: ignore[arg-type]
        later = submit(tg, actor, WhoRuns())
        await anyio.wait_all_tasks_blocked()
        assert actor.statistics().mailbox_depth == 2
        actor.release.set()
        assert await parked == "released"
        assert await later != anyio.get_current_task().id  # a serving task ran it
        assert actor.finished == ["WhoRuns", "Park", "Add", "WhoRuns"]
        assert await actor.ask(Add(1)) == 11


async def test_concurrency_bounds_the_messages_in_hand_wherever_they_run() -> None:
    async with started(mailbox_size=16, concurrency=2) as (actor, tg):
        futures = [submit(tg, actor, Park()) for _ in range(5)]
        await anyio.wait_all_tasks_blocked()
        assert actor.in_hand == 2
        assert actor.statistics().mailbox_depth == 3
        actor.release.set()
        assert [await f for f in futures] == ["released"] * 5
        assert actor.most_in_hand == 2


@pytest.mark.parametrize("where", ["asker", "mailbox"])
async def test_a_cancelled_asker_cancels_the_handler_and_returns_after_it(where: str) -> None:
    """Cancelling the asker cancels the handler at its next await, in either
    place, and ``ask`` returns only once the handler's ``finally`` has run."""
    async with started(mailbox_size=4) as (actor, tg):
        blocker = await park(actor, tg) if where == "mailbox" else None
        seen: list[list[str]] = []

        async def asker() -> None:
            try:
                await actor.ask(Park())
            finally:
                seen.append(list(actor.finished))

        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as inner:
                inner.start_soon(asker)
                if blocker is not None:
                    await anyio.wait_all_tasks_blocked()
                    actor.parked = anyio.Event()
                    actor.release.set()  # the blocker ends, the asker's Park starts
                    actor.release = anyio.Event()
                    assert await blocker == "released"
                await actor.parked.wait()
                scope.cancel()
        assert len(seen) == 1
        assert seen[0].count("Park") == (2 if blocker else 1)
        assert actor.in_hand == 0
        assert await actor.ask(Add(1)) == 1  # still serving


async def test_full_mailbox_applies_backpressure_and_drops_hints() -> None:
    """With the actor parked on one message and a mailbox of 2, two more fit;
    a third ask waits for room, and hints are dropped and counted."""
    async with started(mailbox_size=2) as (actor, tg):
        parked = await park(actor, tg)
        first, second = submit(tg, actor, Add(1)), submit(tg, actor, Add(1))
        await anyio.wait_all_tasks_blocked()
        assert actor.statistics().mailbox_depth == 2
        assert actor.try_tell(Add(100)) is False  # type: ignore[arg-type]
        assert actor.statistics().hints_dropped == 1
        third = submit(tg, actor, Add(10))
        await anyio.wait_all_tasks_blocked()
        assert not third.done()  # waiting for room, not dropped
        assert actor.statistics().mailbox_depth == 2
        actor.release.set()
        assert await parked == "released"
        assert (await first, await second, await third) == (1, 2, 12)


async def test_stop_fails_queued_requests_and_later_sends() -> None:
    async with started(mailbox_size=4) as (actor, tg):
        parked = await park(actor, tg)
        queued = [submit(tg, actor, Add(1)) for _ in range(3)]
        await anyio.wait_all_tasks_blocked()
        await actor.stop()
        actor.release.set()
        assert await parked == "released"  # the message in hand finishes
        for fut in queued:
            with pytest.raises(ActorClosed, match="closed before handling"):
                await fut
        with pytest.raises(ActorClosed):
            await actor.ask(Add(1))
        assert actor.try_tell(Add(1)) is False  # type: ignore[arg-type]
    assert actor.total == 0
    assert actor.stopped


async def test_on_stop_waits_for_messages_handled_in_askers_tasks() -> None:
    async with started() as (actor, tg):
        parked = await park(actor, tg)  # runs in the asker's task
        await actor.stop()
        await anyio.wait_all_tasks_blocked()
        assert not actor.stopped  # on_stop waits for the message in hand
        actor.release.set()
        assert await parked == "released"
        await actor.wait_stopped()
        assert actor.stopped


async def test_cancelling_the_task_group_fails_in_flight_and_queued_asks() -> None:
    with anyio.fail_after(5):
        actor = Counter(mailbox_size=4)
        async with anyio.create_task_group() as outer:
            async with anyio.create_task_group() as tg:
                await tg.start(actor.run)
                blocker = await park(actor, outer)  # in the asker's task
                queued = submit(outer, actor, Add(1))
                await anyio.wait_all_tasks_blocked()
                tg.cancel_scope.cancel()
                # ``run`` ends only once the message in the asker's task has.
                actor.release.set()
            assert await blocker == "released"
            assert isinstance(await queued.settled() or queued.exception(), ActorClosed)
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


async def test_a_sender_cancelled_while_waiting_for_room_sends_nothing() -> None:
    async with started(mailbox_size=1) as (actor, tg):
        parked = await park(actor, tg)
        queued = submit(tg, actor, Add(1))
        await anyio.wait_all_tasks_blocked()
        with anyio.move_on_after(0.05):
            await actor.ask(Add(100))  # waits for room, then is cancelled
        actor.release.set()
        assert await parked == "released"
        assert await queued == 1
        assert await actor.ask(Add(0)) == 1  # the cancelled Add(100) never ran


# -- an actor's own worker threads ----------------------------------------------------


async def test_threads_run_jobs_in_their_own_threads_and_return_results() -> None:
    import threading

    from kvactors.actors import Threads

    threads = Threads("kvactors-test", 2)
    try:
        with anyio.fail_after(10):
            name = await threads.run(lambda: threading.current_thread().name)
            assert name.startswith("kvactors-test-")
            assert name != threading.current_thread().name
            assert await threads.run(divmod, 17, 5) == (3, 2)
    finally:
        threads.close()
    assert not any(t.name.startswith("kvactors-test-") for t in threading.enumerate())


async def test_threads_raise_the_jobs_error_and_keep_serving() -> None:
    from kvactors.actors import Threads

    threads = Threads("kvactors-test", 1)
    try:
        with anyio.fail_after(10):
            with pytest.raises(ZeroDivisionError):
                await threads.run(lambda: 1 // 0)
            assert await threads.run(sum, [1, 2, 3]) == 6
    finally:
        threads.close()
    with pytest.raises(RuntimeError, match="closed"):
        await threads.run(sum, [1])


async def test_threads_run_at_most_count_jobs_at_once() -> None:
    import threading

    from kvactors.actors import Threads

    lock = threading.Lock()
    now = [0]
    most = [0]
    release = threading.Event()

    def job() -> None:
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        release.wait(10)
        with lock:
            now[0] -= 1

    threads = Threads("kvactors-test", 2)
    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(threads.run, job)
                while True:  # two jobs start; the other three wait their turn
                    with lock:
                        if now[0] == 2:
                            break
                    await anyio.sleep(0.001)
                release.set()
    finally:
        threads.close()
    assert most[0] == 2
    assert now[0] == 0
    assert len(threads._threads) == 0


async def test_threads_job_is_not_interrupted_and_its_result_not_lost() -> None:
    """Cancelling the waiter waits for the job to end (it is never abandoned)
    and the cancellation takes effect at the next checkpoint."""
    import threading

    from kvactors.actors import Threads

    started = threading.Event()
    release = threading.Event()
    ended: list[str] = []

    def job() -> str:
        started.set()
        release.wait(10)
        ended.append("job")
        return "done"

    threads = Threads("kvactors-test", 1)
    got: list[str] = []
    try:
        with anyio.fail_after(10):
            scope = anyio.CancelScope()

            async def waiter() -> None:
                with scope:
                    got.append(await threads.run(job))
                    ended.append("returned")
                    await anyio.lowlevel.checkpoint()
                    ended.append("not reached")

            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                while not started.is_set():
                    await anyio.sleep(0.001)
                scope.cancel()
                await anyio.sleep(0.01)
                assert ended == []  # the waiter still waits for the job
                release.set()
    finally:
        threads.close()
    assert got == ["done"]
    assert ended == ["job", "returned"]
