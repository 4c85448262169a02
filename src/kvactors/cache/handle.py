"""The served cache's front door: :func:`open` and the :class:`KVCache` handle it yields.

``async with kvactors.open(config) as kv:`` opens the media (the GPU pool and
one medium per tier of ``Config.chain()``), starts one tier actor per tier,
the policy actor and the coordinator in one task group, and on exit waits for
the futures of ``submit_*``, lets handshakes in flight finish, then stops the
coordinator, the policy actor and the tiers in that order. Every resource the
cache made (media, the copy threads) is closed with it.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, cast

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from kvactors.actors import Actor, Future, loop_checkpoints
from kvactors.cache.arguments import check_key_list, check_side
from kvactors.cache.coordinator import Coordinator
from kvactors.cache.events import CacheEvent
from kvactors.cache.messages import GetSnapshot, Load, Lookup, Prefetch, Store, Subscribe
from kvactors.cache.policy_actor import PolicyActor
from kvactors.cache.results import (
    CacheStats,
    FlushResult,
    Latency,
    LoadResult,
    LookupResult,
    StoreResult,
)
from kvactors.cache.tier_actor import TierActor
from kvactors.config import Config
from kvactors.errors import ActorClosed, ConfigError, TensorSpecError
from kvactors.keys import Key
from kvactors.media import BlockMedium, CopyPool, MemoryPool, open_media
from kvactors.media.nvme_index import NVMeIndex

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["KVCache", "open"]


def _recovered(medium: BlockMedium) -> NVMeIndex | list[tuple[Key, int]]:
    """What a medium held when opened: an NVMe store's index itself (its tier's
    manager restores from it with no object per entry), else ``(key, slot)`` pairs."""
    index = getattr(medium, "index", None)
    if isinstance(index, NVMeIndex):
        return index
    return [(e.key, e.slot) for e in medium.recovered()]


def _unwrap(group: BaseExceptionGroup[Any], body: BaseException | None) -> BaseException | None:
    """The single error a group of groups holds, if it holds exactly one; the
    descent stops at ``body`` (the error that left the ``async with`` body,
    which may be a group of the caller's own)."""
    errors = group.exceptions
    if len(errors) != 1:
        return None
    inner = errors[0]
    if inner is body or not isinstance(inner, BaseExceptionGroup):
        return inner
    return _unwrap(inner, body)


class KVCache:
    """The handle ``kvactors.open`` yields. Every method may be called from any
    task of the event loop that opened the cache.

    Sources and destinations (``src`` / ``dst``) are either a list of GPU-pool
    slot ids, one per key, or a tensor of ``len(keys)`` blocks on the CPU or a
    CUDA device: shape ``(n, block_bytes)`` ``uint8``, or any contiguous tensor
    of ``n * block_bytes`` bytes whose first dimension is ``n``. With
    ``Config(move_bytes=False)`` they are ``None``: blocks are placed,
    evicted, promoted and demoted as usual, and no byte moves.
    """

    def __init__(
        self,
        config: Config,
        coordinator: Coordinator,
        task_group: anyio.abc.TaskGroup,
    ) -> None:
        self.config = config
        self._coord = coordinator
        self._policy = coordinator.policy
        # ``check_side(side, n, what)`` for this cache's block size, GPU pool, mode.
        self._check_side = functools.partial(
            check_side, config.block_bytes, coordinator.gpu.num_blocks, config.move_bytes
        )
        self._tg = task_group
        self._closed = False
        # Futures of ``submit_*`` whose call has not ended yet.
        self._submitted: set[Future[Any]] = set()
        self._lookup_latency = Latency()
        # The running backend's yield, looked up once (KVCache is made on its loop).
        self._checkpoint = loop_checkpoints()[0]
        self.metrics_url: str | None = None
        """Where Prometheus scrapes this cache (``[metrics] port`` set), else ``None``."""
        self.flushed: list[FlushResult] = []
        """Once closed: what was written back into each tier written ``on_demotion``
        (the remote tier) as the cache closed; failures are also logged."""

    @property
    def gpu_pool(self) -> MemoryPool:
        """The GPU pool (``device="cpu"`` without CUDA) that slot ids name."""
        return self._coord.gpu

    def medium(self, tier: str) -> BlockMedium:
        """The medium of tier ``tier`` (``"cpu"``, ``"nvme"``, ...)."""
        try:
            return self._coord.tiers[tier].medium
        except KeyError:
            known = ", ".join(self._coord.chain)
            raise KeyError(f"no tier named {tier!r}; this cache has {known}") from None

    # -- validation -----------------------------------------------------------------

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ActorClosed(f"{what}: the cache is closed")

    async def _call(self, request: Store | Load) -> Any:
        # Every call yields to the event loop once, before anything happens
        # (and is cancelled there, with nothing done, if its caller is).
        await self._checkpoint()
        return await self._coord.ask(request)

    # -- the API --------------------------------------------------------------------

    async def lookup(self, keys: Sequence[Key]) -> LookupResult:
        """How many leading ``keys`` are available, and in which tier each is.

        Each key named counts as an access of its block for the eviction
        policy; a ``load`` of it that follows is the same access, not a second.
        Raises :class:`~kvactors.errors.InvalidKeyError` for bad keys and
        :class:`~kvactors.errors.ActorClosed` after close. Cancelling it changes nothing.
        """
        self._check_open("lookup")
        message = Lookup(check_key_list(keys, "lookup"))
        await self._checkpoint()
        start = time.perf_counter()
        if self._coord.shared:
            # Keys no tier holds: ask the shared (remote) tier, in one batch.
            await self._coord.discover(message.keys)
        result = await self._policy.ask(message)
        self._lookup_latency.add(time.perf_counter() - start)
        return result

    def _store(self, keys: Sequence[Key], src: Any) -> Store:
        self._check_open("store")
        checked = check_key_list(keys, "store")
        return Store(checked, self._check_side(src, len(checked), "store src"))

    def _load(self, keys: Sequence[Key], dst: Any, partial: bool) -> Load:
        self._check_open("load")
        checked = check_key_list(keys, "load")
        if type(partial) is not bool:
            raise TensorSpecError(f"load: partial must be True or False, got {partial!r}")
        return Load(checked, self._check_side(dst, len(checked), "load dst"), partial)

    async def store(self, keys: Sequence[Key], src: Any) -> StoreResult | None:
        """Store the blocks of ``src`` under ``keys`` (keys already cached are skipped).

        Returns ``None`` when the cache cannot take them now (every block pinned
        or in flight): nothing changed. A key another store is still writing
        is waited for: it is then present, or stored by this call if that
        store failed. Raises :class:`~kvactors.errors.TierError` if the
        transfer failed (the blocks are then not stored). If cancelled, the
        store completes as failed, and the call returns once the transfer in
        flight (if any) has ended: ``src`` is not read afterwards.
        """
        result: StoreResult | None = await self._call(self._store(keys, src))
        return result

    async def load(self, keys: Sequence[Key], dst: Any, *, partial: bool = False) -> LoadResult:
        """Copy the cached blocks ``keys`` into ``dst``, promoting deeper blocks to CPU.

        With ``partial=True`` it loads the longest leading run of keys available
        at the time of the call (a lookup and a load in one atomic step; other
        requests may evict blocks between a separate ``lookup`` and ``load``)
        and says how many in the result; blocks that fail their checksum end
        the run (they are dropped). A block being demoted (its victim copy
        on its way to the next tier) is in the cache all along: the load
        waits for the demotion and reads it from there. Otherwise it raises
        :class:`~kvactors.errors.BlockNotFoundError` (nothing pinned) if a key
        is not available, :class:`~kvactors.errors.TierError` if a transfer
        failed. If cancelled, every pin is released, and the call returns once
        the transfer in flight (if any) has ended: ``dst`` is not written afterwards.
        """
        result: LoadResult = await self._call(self._load(keys, dst, partial))
        return result

    def submit_store(self, keys: Sequence[Key], src: Any) -> Future[StoreResult | None]:
        """Start :meth:`store` and return its future at once (poll ``done()``).
        Arguments are checked here: a bad one raises at once."""
        if self._closed:
            return self._submit(Store([], None))
        return self._submit(self._store(keys, src))

    def submit_load(
        self, keys: Sequence[Key], dst: Any, *, partial: bool = False
    ) -> Future[LoadResult]:
        """Start :meth:`load` and return its future at once (poll ``done()``)."""
        if self._closed:
            return self._submit(Load([], None))
        return self._submit(self._load(keys, dst, partial))

    def _submit(self, request: Store | Load) -> Future[Any]:
        fut: Future[Any] = Future()
        if self._closed:
            fut.set_exception(ActorClosed("submit: the cache is closed"))
            return fut

        async def run() -> None:
            try:
                fut.set_result(await self._call(request))
            except Exception as exc:  # delivered through the future, never lost
                fut.set_exception(exc)
            except BaseException:
                fut.set_exception(ActorClosed("the cache closed before the request finished"))
                raise
            finally:
                self._submitted.discard(fut)

        self._submitted.add(fut)
        self._tg.start_soon(run)
        return fut

    async def _finish_submitted(self) -> None:
        """Wait until every call started by ``submit_*`` has ended (those
        submitted meanwhile included)."""
        while self._submitted:
            fut = next(iter(self._submitted))
            await fut.settled()
            self._submitted.discard(fut)

    def prefetch(self, keys: Sequence[Key]) -> bool:
        """Hint that ``keys`` will be loaded soon: blocks held below the CPU tier
        are promoted to it.

        Lossy: returns ``False`` (and counts it) when the coordinator's mailbox
        is full or the cache is closed. Never waits, never raises for that.
        """
        return self._coord.try_tell(Prefetch(check_key_list(keys, "prefetch")))

    async def events(self) -> AsyncIterator[CacheEvent]:
        """Events from now on; the stream ends when the cache closes."""
        self._check_open("events")
        stream: AsyncIterator[CacheEvent] = await self._policy.ask(Subscribe())
        # Subscribed first, so nothing published from the call on is missed; then
        # a cancellation point that yields once, as every call (cancelled there,
        # the stream is closed again).
        try:
            await self._checkpoint()
        except BaseException:
            cast(MemoryObjectReceiveStream[CacheEvent], stream).close()
            raise
        return stream

    async def stats(self) -> CacheStats:
        self._check_open("stats")
        await self._checkpoint()  # a loop polling stats still lets other tasks run
        snap = await self._policy.ask(GetSnapshot())
        tiers = list(self._coord.tiers.values())
        actors = [self._coord.statistics(), self._policy.statistics()]
        actors += [t.statistics() for t in tiers]
        return CacheStats(
            policy=snap,
            tiers={t.name: t.tier_stats() for t in tiers},
            actors=actors,
            latency={
                "lookup": self._lookup_latency.snapshot(),
                "store": self._coord.latency["store"].snapshot(),
                "load": self._coord.latency["load"].snapshot(),
            },
            failed_stores=self._coord.failed["store"],
            failed_loads=self._coord.failed["load"],
            prefetch_dropped=self._coord.statistics().hints_dropped,
            remote=next(
                (t.medium.counters() for t in tiers if hasattr(t.medium, "counters")), None
            ),
        )


log = logging.getLogger("kvactors.cache")


def _report_flush(results: list[FlushResult]) -> None:
    for r in results:
        if r.error is not None:
            log.warning(
                "closing: tier %r: %d block(s) written back, %d failed, %d left: %s",
                r.tier,
                r.written,
                r.failed,
                r.left,
                r.error,
            )


class _Started:
    """The task status of an actor started by :func:`_run_until_stopped`."""

    def __init__(self) -> None:
        self.event = anyio.Event()

    def started(self, value: None = None) -> None:
        self.event.set()


async def _run_until_stopped(actor: Actor[Any], status: _Started) -> None:
    """``actor.run``, out of reach of a cancellation of the ``async with`` block
    (started with ``start_soon``: ``TaskGroup.start`` cancelled would wait for
    it): closing still needs the actors (the write-back at close asks the
    policy actor and the tiers), and stops them itself, in dependency order."""
    with anyio.CancelScope(shield=True):
        await actor.run(task_status=status)


@asynccontextmanager
async def open(config: Config | None = None) -> AsyncIterator[KVCache]:
    """Start every actor of a cache built from ``config`` (defaults when ``None``).

    On exit, also with an error, the futures of ``submit_*`` and the handshakes
    in flight finish (a block left by cancellation cancels the calls of
    ``submit_*``: their futures hold :class:`~kvactors.errors.ActorClosed`),
    then the coordinator, the policy actor and the tiers stop in that order;
    requests still queued fail with :class:`~kvactors.errors.ActorClosed`.
    Pools too large for this machine raise :class:`~kvactors.errors.ConfigError`
    naming the field before anything is allocated; a start-up failure (say, an
    NVMe directory that cannot be created) raises
    :class:`~kvactors.errors.ActorStartError` or the medium's own typed error,
    with everything opened so far closed again. An error raised in the body
    leaves the block as itself, not wrapped in an exception group. Anything
    but a :class:`~kvactors.Config` or ``None`` raises ``ConfigError``.
    """
    if config is None:
        config = Config()
    elif not isinstance(config, Config):
        raise ConfigError(f"open: expected a kvactors.Config or None, got {type(config).__name__}")
    gpu, media = open_media(config)
    copier = CopyPool()
    tiers: list[TierActor] = []
    started: list[Actor[Any]] = []
    body_error: BaseException | None = None
    try:
        specs = dict(config.chain())
        for medium in media:
            # File media always do their I/O in threads (inline_bytes: 0).
            inline = config.inline_bytes if medium.in_memory else 0
            tiers.append(
                TierActor(
                    medium,
                    threads=specs[medium.name].threads,
                    mailbox_size=config.mailbox_size,
                    inline_bytes=inline,
                    copier=copier,
                    move_bytes=config.move_bytes,
                )
            )
        recovered = [_recovered(m) for m in media]
        policy = PolicyActor(config, [(m.name, m.durable) for m in media], recovered)
        coord = Coordinator(config, policy, gpu, tiers)
        order: list[Actor[Any]] = [*tiers, policy, coord]
        async with anyio.create_task_group() as tg:
            try:
                for actor in order:
                    status = _Started()
                    tg.start_soon(_run_until_stopped, actor, status)
                    # Cancelled (or an actor failed to start: the group cancels
                    # this), the finally below stops every actor, started or not.
                    await status.event.wait()
                    started.append(actor)
                kv: KVCache | None = None
                try:
                    async with anyio.create_task_group() as user_tg:
                        kv = KVCache(config, coord, user_tg)
                        port = config.metrics.port if config.metrics is not None else None
                        try:
                            async with AsyncExitStack() as serving:
                                if config.metrics is not None and port is not None:
                                    from kvactors.cache.metrics import serve_metrics

                                    # Prometheus metrics on [metrics] host:port while open.
                                    endpoint = await serving.enter_async_context(
                                        serve_metrics(kv, port=port, host=config.metrics.host)
                                    )
                                    kv.metrics_url = endpoint.url
                                try:
                                    yield kv
                                except BaseException as exc:
                                    body_error = exc  # left as itself, below
                                    raise
                        except Exception:
                            # An error leaving the block: the calls of ``submit_*``
                            # still end, as on a plain exit, before the task group
                            # would cancel them.
                            with anyio.CancelScope(shield=True):
                                await kv._finish_submitted()
                            raise
                finally:
                    if kv is not None:
                        kv._closed = True
                        if coord.write_back:
                            # Blocks a tier written on demotion would lose: written
                            # back now, within its flush_timeout, whatever ended the block.
                            with anyio.CancelScope(shield=True):
                                kv.flushed = await coord.flush()
                            _report_flush(kv.flushed)
            finally:
                # Dependency order: nothing new reaches the coordinator, then the
                # policy actor, then the tiers that in-flight handshakes still use.
                with anyio.CancelScope(shield=True):
                    for actor in reversed(order):
                        await actor.stop()
                        if actor is coord and actor in started:
                            await coord.wait_stopped()
    except BaseExceptionGroup as group:
        if body_error is group:  # the caller's own group, no task group around it
            raise
        single = _unwrap(group, body_error)
        if isinstance(single, Exception):
            raise single from None
        raise
    finally:
        # A tier actor closes its medium when it stops; media of tiers that
        # never started are closed here, and the cache's own threads.
        for tier in tiers:
            if tier not in started:
                tier.medium.close()
        for medium in media[len(tiers) :]:
            medium.close()
        gpu.close()
        copier.close()
