"""The coordinator: the front door of the cache.

``async with kvactors.open(config) as kv:`` starts the tier actors, the policy
actor and the coordinator actor in one task group and stops them in dependency
order on exit (coordinator, policy, tiers). Every store, load and prefetch
travels as a message to the coordinator actor, which runs up to
``max_inflight`` handshakes at once, each ``prepare -> transfer -> complete``
(``lookup``, ``events`` and ``stats`` involve no handshake and ask the policy
actor directly):

- the handshake runs in the coordinator's task, not the caller's, so
  ``complete`` always runs: a cancelled caller never leaves a pin or a
  half-written block behind;
- a caller cancelled before its transfer starts skips the transfer; a store
  whose caller was cancelled completes with ``success=False`` (its bytes may be
  torn), so it is never served. The cancelled call returns once the job already
  in flight has finished: after ``store`` / ``load`` returns, by cancellation
  or otherwise, kvactors no longer reads ``src`` or writes ``dst``;
- a handshake that needs no await at all (every block in memory, copies of at
  most ``Config.inline_bytes``, the actors involved idle) runs at once, to its
  end, in the caller's task (``Coordinator.handle_now``): with no await inside
  it, nothing can cancel it half-way or interleave with it. Every call yields
  to the event loop once before it starts, and is cancelled there if its
  caller is.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import torch

from kvactors.actors import NOT_NOW, Actor, ActorStats, Future
from kvactors.cache.events import CacheEvent
from kvactors.cache.policy_actor import (
    CompleteLoad,
    CompleteStore,
    Demotion,
    Drop,
    GetSnapshot,
    LoadPlan,
    Lookup,
    LookupResult,
    MarkFailed,
    PolicyActor,
    PrepareLoad,
    PrepareStore,
    Snapshot,
    StorePlan,
    Subscribe,
)
from kvactors.cache.tier_actor import Copy, Read, TierActor, TierStats, Write
from kvactors.cache.tier_actor import Drop as TierDrop
from kvactors.config import Config
from kvactors.errors import (
    ActorClosed,
    IntegrityError,
    InvalidKeyError,
    KVActorsError,
    TensorSpecError,
    TierError,
    TierFailed,
)
from kvactors.keys import Key
from kvactors.manager import check_keys, distinct_slots
from kvactors.media import BlockMedium

__all__ = ["CacheStats", "KVCache", "LoadResult", "StoreResult", "open"]


class StoreResult(msgspec.Struct, frozen=True):
    """``stored`` blocks were written; ``present`` were already cached."""

    stored: int
    present: int


class LoadResult(msgspec.Struct, frozen=True):
    """``len(tiers)`` leading blocks were loaded (all of them unless ``partial``);
    ``tiers[i]`` is where block ``i`` came from."""

    tiers: list[str]


class LatencyStats(msgspec.Struct, frozen=True):
    count: int
    p50_us: float
    p99_us: float


class CacheStats(msgspec.Struct, frozen=True):
    policy: Snapshot
    tiers: dict[str, TierStats]
    actors: list[ActorStats]
    latency: dict[str, LatencyStats]
    failed_stores: int
    failed_loads: int
    prefetch_dropped: int


# -- messages ---------------------------------------------------------------------


class Ticket:
    """Set by the caller when it is cancelled; read by the handshake between steps."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False


class DoStore(msgspec.Struct, frozen=True, tag=True):
    keys: list[Key]
    src: Any  # list[int] of GPU-pool slots, or a (n, block_bytes) uint8 tensor
    ticket: Any


class DoLoad(msgspec.Struct, frozen=True, tag=True):
    keys: list[Key]
    dst: Any
    ticket: Any
    partial: bool = False


class DoPrefetch(msgspec.Struct, frozen=True, tag=True):
    keys: list[Key]


CoordinatorRequest = DoStore | DoLoad | DoPrefetch


def _check_keys(keys: Sequence[Key], what: str) -> list[Key]:
    keys = list(keys)
    if not keys:
        raise InvalidKeyError(f"{what}: no keys given")
    check_keys(keys, what)
    return keys


class _Latency:
    """A bounded reservoir of latencies in microseconds."""

    def __init__(self, size: int = 8192) -> None:
        self.samples: list[float] = []
        self.size = size
        self.count = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        if len(self.samples) < self.size:
            self.samples.append(seconds * 1e6)
        else:
            self.samples[self.count % self.size] = seconds * 1e6

    def snapshot(self) -> LatencyStats:
        if not self.samples:
            return LatencyStats(0, 0.0, 0.0)
        s = sorted(self.samples)
        return LatencyStats(self.count, s[len(s) // 2], s[min(len(s) - 1, int(len(s) * 0.99))])


class _Lifted:
    """What the upward part of a load plan completed, whatever was raised after."""

    __slots__ = ("demoted", "promoted")

    def __init__(self) -> None:
        self.demoted = False
        self.promoted = False


class Coordinator(Actor[CoordinatorRequest]):
    """Runs handshakes; see the module docstring."""

    def __init__(
        self,
        config: Config,
        policy: PolicyActor,
        gpu: TierActor,
        cpu: TierActor,
        nvme: TierActor | None,
    ) -> None:
        super().__init__(
            "coordinator", mailbox_size=config.mailbox_size, concurrency=config.max_inflight
        )
        self.config = config
        self.policy = policy
        self.gpu = gpu
        self.cpu = cpu
        self.nvme = nvme
        self.block_bytes = config.block_bytes
        # ``kv.lookup`` asks the policy actor itself and keeps its own latencies.
        self.latency = {name: _Latency() for name in ("store", "load")}
        self.failed_stores = 0
        self.failed_loads = 0
        self.failed_tiers: set[str] = set()

    async def handle(self, message: CoordinatorRequest) -> Any:
        start = time.perf_counter()
        match message:
            case DoStore(keys, src, ticket):
                if ticket.cancelled:
                    return None
                try:
                    return await self._store(keys, src, ticket)
                finally:
                    self.latency["store"].add(time.perf_counter() - start)
            case DoLoad(keys, dst, ticket, partial):
                if ticket.cancelled:
                    return None
                try:
                    return await self._load(keys, dst, ticket, partial)
                finally:
                    self.latency["load"].add(time.perf_counter() - start)
            case DoPrefetch(keys):
                return await self._prefetch(keys)

    def handle_now(self, message: CoordinatorRequest) -> Any:
        # A handshake whose every step an idle actor answers at once (blocks in
        # memory only, copies of at most ``inline_bytes``) runs right here to
        # its end, with no await: nothing can interleave with it or cancel it
        # half-way, so prepare -> transfer -> complete holds as in ``handle``.
        # Anything else returns NOT_NOW before changing anything.
        match message:
            case DoStore(keys, src, _):
                return self._at_once(
                    "store",
                    src,
                    len(keys),
                    PrepareStore(keys, local=True),
                    lambda plan: None if plan is None else self._store_now(keys, src, plan),
                )
            case DoLoad(keys, dst, _, partial) if not partial:
                return self._at_once(
                    "load",
                    dst,
                    len(keys),
                    PrepareLoad(keys, local=True),
                    lambda plan: self._load_now(dst, plan),
                )
        return NOT_NOW

    def _at_once(
        self, kind: str, side: Any, n: int, prepare: Any, finish: Callable[[Any], Any]
    ) -> Any:
        """Prepare at once and ``finish`` the plan, or NOT_NOW with nothing changed
        when the tier cannot copy ``n`` blocks inline or the plan needs NVMe."""
        tier = self.cpu if isinstance(side, torch.Tensor) else self.gpu
        if not tier.can_run_now(n, self.cpu.medium):
            return NOT_NOW
        start = time.perf_counter()
        plan = self.policy.ask_now(prepare)
        if plan is NOT_NOW:
            return NOT_NOW
        try:
            return finish(plan)
        finally:
            self.latency[kind].add(time.perf_counter() - start)

    def _run_now(self, actor: Actor[Any], message: Any) -> Any:
        result = actor.ask_now(message)
        # Checked idle just before, and nothing else has run since.
        assert result is not NOT_NOW, f"{actor.name} was not idle"
        return result

    def _store_now(self, keys: list[Key], src: Any, plan: StorePlan) -> StoreResult:
        """``_store`` for a memory-only plan, without awaiting."""
        assert plan.demote is None
        assert not plan.through_keys
        stored = False
        try:
            if plan.cpu_ids:
                self._run_now(*self._store_job(plan.cpu_ids, src, plan.index))
            stored = True
        except BaseException:
            self.failed_stores += 1
            raise
        finally:
            self._run_now(self.policy, CompleteStore(plan, stored, False, False))
        return StoreResult(len(plan.keys), len(keys) - len(plan.keys))

    def _load_now(self, dst: Any, plan: LoadPlan) -> LoadResult:
        """``_load_once`` for a plan of blocks ready in ``cpu``, without awaiting."""
        assert not plan.promote_keys
        assert not plan.direct_keys
        assert plan.demote is None
        try:
            actor, job, rows = self._read_job(
                self.cpu, plan.cpu_ids, dst, plan.cpu_pos, plan.cpu_keys, True
            )
            self._run_now(actor, job)
            if rows is not None:
                self._scatter(dst, plan.cpu_pos, rows)
        except BaseException:
            self.failed_loads += 1
            raise
        finally:
            self._run_now(self.policy, CompleteLoad(plan, False, False))
        return LoadResult(["cpu"] * len(plan.cpu_keys))

    # -- transfers ------------------------------------------------------------------

    def _store_job(self, cpu_ids: list[int], side: Any, index: list[int]) -> tuple[TierActor, Any]:
        """The tier and job that write the caller's blocks ``index`` (positions in
        increasing order) into ``cpu`` slots ``cpu_ids``."""
        if isinstance(side, torch.Tensor):
            if len(index) != side.shape[0]:
                side = side[torch.tensor(index, dtype=torch.long, device=side.device)]
            return self.cpu, Write(cpu_ids, side)
        # All positions: the slot list itself.
        gpu_ids = side if len(index) == len(side) else [side[i] for i in index]
        return self.gpu, Copy(self.cpu.medium, cpu_ids, gpu_ids, outbound=True)

    def _read_job(
        self,
        tier: TierActor,
        ids: list[int],
        side: Any,
        index: list[int],
        keys: list[Key],
        increasing: bool,
    ) -> tuple[TierActor, Any, torch.Tensor | None]:
        """The tier and job that copy slots ``ids`` (blocks ``keys``) of ``tier`` into
        the caller's blocks ``index``, and the rows to scatter into ``side`` after
        it (``None``: the job writes ``side`` itself). Reads from ``nvme`` are
        verified against each block's checksum. ``increasing``: ``index`` is in
        increasing order, so all of ``side``'s positions means ``side`` itself."""
        verify = keys if tier is self.nvme else None
        whole = len(index) == len(side) and (increasing or index == list(range(len(side))))
        if isinstance(side, torch.Tensor):
            if whole:
                return tier, Read(ids, side, verify), None
            rows = torch.empty((len(ids), self.block_bytes), dtype=torch.uint8)
            return tier, Read(ids, rows, verify), rows
        gpu_ids = side if whole else [side[i] for i in index]
        return self.gpu, Copy(tier.medium, ids, gpu_ids, keys=verify), None

    @staticmethod
    def _scatter(side: torch.Tensor, index: list[int], rows: torch.Tensor) -> None:
        side[torch.tensor(index, dtype=torch.long, device=side.device)] = rows.to(side.device)

    async def _to_cpu(self, cpu_ids: list[int], side: Any, index: list[int]) -> None:
        """Write the caller's blocks ``index`` into ``cpu`` slots ``cpu_ids``."""
        if cpu_ids:
            await self._ask_tier(*self._store_job(cpu_ids, side, index))

    async def _from_tier(
        self,
        tier: TierActor,
        ids: list[int],
        side: Any,
        index: list[int],
        keys: list[Key],
        increasing: bool = False,
    ) -> None:
        """Copy slots ``ids`` (blocks ``keys``) of ``tier`` into the caller's blocks ``index``."""
        if not ids:
            return
        actor, job, rows = self._read_job(tier, ids, side, index, keys, increasing)
        await self._ask_tier(actor, job)
        if rows is not None:
            self._scatter(side, index, rows)

    async def _ask_tier(self, tier: TierActor, job: Any) -> Any:
        try:
            return await tier.ask(job)
        except ActorClosed as exc:
            self.failed_tiers.add(tier.name)
            raise TierFailed(f"tier {tier.name!r} is down") from exc

    async def _to_nvme(self, cpu_ids: list[int], nvme_ids: list[int], keys: list[Key]) -> bool:
        """Write ``cpu`` blocks down to ``nvme`` (indexed under ``keys``); ``False`` on failure."""
        assert self.nvme is not None
        try:
            await self._ask_tier(self.nvme, Copy(self.cpu.medium, cpu_ids, nvme_ids, keys=keys))
        except TierError:
            await self._tier_failed(self.nvme)
            return False
        return True

    async def _promote(self, cpu_ids: list[int], nvme_ids: list[int], keys: list[Key]) -> None:
        """Read verified ``nvme`` blocks up into ``cpu`` slots."""
        assert self.nvme is not None
        try:
            await self._ask_tier(
                self.nvme, Copy(self.cpu.medium, cpu_ids, nvme_ids, outbound=True, keys=keys)
            )
        except TierError:
            await self._tier_failed(self.nvme)
            raise

    async def _lift(self, plan: LoadPlan, lifted: _Lifted) -> None:
        """Demote the plan's CPU victims, then promote its NVMe blocks into CPU,
        recording in ``lifted`` what completed (for ``CompleteLoad``)."""
        lifted.demoted = await self._demote(plan.demote)
        if plan.promote_keys:
            await self._promote(plan.promote_cpu_ids, plan.promote_nvme_ids, plan.promote_keys)
            lifted.promoted = True

    async def _demote(self, demote: Demotion | None) -> bool:
        if demote is None or self.nvme is None:
            return False
        return await self._to_nvme(demote.cpu_ids, demote.nvme_ids, demote.keys)

    async def _tier_failed(self, tier: TierActor) -> None:
        if tier.statistics().running and tier.tier_stats().crashed is None:
            return  # a job failed; the tier itself is alive
        if tier.name not in self.failed_tiers:
            self.failed_tiers.add(tier.name)
            await self.policy.ask(MarkFailed(tier.name))

    async def _settle(self, message: CompleteStore | CompleteLoad) -> None:
        """Send a ``Complete*``: it is handled whatever happened before,
        cancellation of this task included."""
        # An idle policy actor settles it right here, with no await that a
        # cancellation could interrupt; otherwise wait for it, shielded.
        if self.policy.ask_now(message) is NOT_NOW:
            with anyio.CancelScope(shield=True):
                await self.policy.ask(message)

    async def _drop_corrupted(self, keys: list[Key]) -> None:
        """Forget blocks that failed their checksum: index first, then metadata."""
        if not keys or self.nvme is None:
            return
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(KVActorsError):  # a tier that is down: nothing to forget
                await self.nvme.ask(TierDrop(keys))
            await self.policy.ask(Drop("nvme", keys, corrupted=True))

    # -- handshakes -----------------------------------------------------------------

    async def _store(self, keys: list[Key], src: Any, ticket: Ticket) -> StoreResult | None:
        plan: StorePlan | None = await self.policy.ask(PrepareStore(keys))
        if plan is None:
            return None
        stored = demoted = through = False
        try:
            if plan.demote is not None:
                demoted = await self._demote(plan.demote)
            if ticket.cancelled:
                return None
            await self._to_cpu(plan.cpu_ids, src, plan.index)
            stored = not ticket.cancelled
            if stored and plan.through_keys and self.nvme is not None:
                cpu_ids = [plan.cpu_ids[j] for j in plan.through_pos]
                through = await self._to_nvme(cpu_ids, plan.through_ids, plan.through_keys)
        except BaseException:
            self.failed_stores += 1
            raise
        finally:
            # Runs whatever happened above, cancellation of this task included.
            await self._settle(CompleteStore(plan, stored, demoted, through))
        return StoreResult(len(plan.keys), len(keys) - len(plan.keys))

    async def _load(self, keys: list[Key], dst: Any, ticket: Ticket, partial: bool) -> LoadResult:
        try:
            return await self._load_once(keys, dst, ticket, partial)
        except IntegrityError:
            if not partial:
                self.failed_loads += 1
                raise
        # The corrupt blocks are gone now: a partial load stops before them.
        return await self._load_once(keys, dst, ticket, partial)

    async def _load_once(
        self, keys: list[Key], dst: Any, ticket: Ticket, partial: bool
    ) -> LoadResult:
        plan: LoadPlan = await self.policy.ask(PrepareLoad(keys, partial=partial))
        n = len(plan.cpu_keys) + len(plan.promote_keys) + len(plan.direct_keys)
        lifted = _Lifted()
        corrupted: list[Key] = []
        try:
            if plan.demote is not None or plan.promote_keys:
                await self._lift(plan, lifted)
            if not ticket.cancelled:
                # Plan positions are in increasing order, promoted ones apart.
                if plan.promote_keys:
                    cpu_ids = plan.cpu_ids + plan.promote_cpu_ids
                    cpu_pos = plan.cpu_pos + plan.promote_pos
                    cpu_keys = plan.cpu_keys + plan.promote_keys
                else:
                    cpu_ids, cpu_pos, cpu_keys = plan.cpu_ids, plan.cpu_pos, plan.cpu_keys
                await self._from_tier(
                    self.cpu, cpu_ids, dst, cpu_pos, cpu_keys, not plan.promote_keys
                )
                if plan.direct_keys and self.nvme is not None:
                    await self._from_tier(
                        self.nvme,
                        plan.direct_nvme_ids,
                        dst,
                        plan.direct_pos,
                        plan.direct_keys,
                        True,
                    )
        except IntegrityError as exc:
            corrupted = exc.keys
            raise
        except BaseException:
            self.failed_loads += 1
            raise
        finally:
            await self._settle(CompleteLoad(plan, lifted.promoted, lifted.demoted))
            await self._drop_corrupted(corrupted)
        tiers = ["cpu"] * n
        for pos in plan.promote_pos + plan.direct_pos:
            tiers[pos] = "nvme"
        return LoadResult(tiers)

    async def _prefetch(self, keys: list[Key]) -> int:
        if self.nvme is None:
            return 0
        plan: LoadPlan = await self.policy.ask(PrepareLoad(keys, prefetch=True))
        lifted = _Lifted()
        corrupted: list[Key] = []
        try:
            await self._lift(plan, lifted)
        except IntegrityError as exc:
            corrupted = exc.keys
        except TierError:
            pass  # a hint: nothing to report; the tier was marked failed if it crashed
        finally:
            await self._settle(CompleteLoad(plan, lifted.promoted, lifted.demoted))
            await self._drop_corrupted(corrupted)
        return len(plan.promote_keys) if lifted.promoted else 0


class KVCache:
    """The handle ``kvactors.open`` yields. Every method may be called from any
    task of the event loop that opened the cache.

    Sources and destinations (``src`` / ``dst``) are either a list of GPU-pool
    slot ids, one per key, or a tensor of ``len(keys)`` blocks: shape
    ``(n, block_bytes)`` ``uint8``, or any contiguous tensor of
    ``n * block_bytes`` bytes whose first dimension is ``n``.
    """

    def __init__(
        self,
        config: Config,
        coordinator: Coordinator,
        task_group: anyio.abc.TaskGroup,
    ) -> None:
        self.config = config
        self._coord = coordinator
        self._tg = task_group
        self._closed = False
        self._lookup_latency = _Latency()

    @property
    def gpu_pool(self) -> BlockMedium:
        """The GPU pool (``device="cpu"`` without CUDA) that slot ids name."""
        return self._coord.gpu.medium

    # -- validation -----------------------------------------------------------------

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ActorClosed(f"{what}: the cache is closed")

    def _check_side(self, side: Any, n: int, what: str) -> Any:
        bb = self.config.block_bytes
        if isinstance(side, torch.Tensor):
            if side.dim() == 0 or side.shape[0] != n:
                raise TensorSpecError(
                    f"{what}: tensor must have {n} blocks in its first dimension, "
                    f"got shape {tuple(side.shape)}"
                )
            if side.nbytes != n * bb:
                raise TensorSpecError(
                    f"{what}: tensor holds {side.nbytes} bytes, expected {n} x {bb}"
                )
            if not side.is_contiguous():
                raise TensorSpecError(f"{what}: tensor must be contiguous")
            return (
                side.view(torch.uint8).view(n, bb)
                if side.dtype != torch.uint8
                else side.view(n, bb)
            )
        limit = self.gpu_pool.num_blocks
        if distinct_slots(side, limit) and len(side) == n:
            return side.copy()  # the common case; anything else gets the checks below
        try:
            # Numpy or torch integers, tuples, ranges: converted.
            ids = [int(i) for i in side]
        except TypeError:
            kind = type(side).__name__
            raise TensorSpecError(
                f"{what}: expected a tensor or a list of GPU-pool slot ids, got {kind}"
            ) from None
        if len(ids) != n:
            raise TensorSpecError(f"{what}: {len(ids)} slot ids for {n} keys")
        if ids and (min(ids) < 0 or max(ids) >= limit):
            bad = next(i for i in ids if not 0 <= i < limit)
            raise TensorSpecError(f"{what}: GPU-pool slot {bad} is out of range 0..{limit - 1}")
        if len(set(ids)) != len(ids):
            raise TensorSpecError(f"{what}: a GPU-pool slot id is named twice")
        return ids

    async def _ask(self, message: Any, ticket: Ticket) -> Any:
        # Every call yields to the event loop once, before anything happens
        # (and raises there if its caller is cancelled).
        await anyio.lowlevel.checkpoint()
        # An idle coordinator runs a handshake that needs no await at once,
        # to its end (``Coordinator.handle_now``); any other goes by mailbox.
        result = self._coord.ask_now(message)
        if result is not NOT_NOW:
            return result
        try:
            reply = self._coord.ask_nowait(message)
        except anyio.WouldBlock:
            # Cancelled while waiting for mailbox room: nothing was sent, nothing to undo.
            reply = await self._coord.post(message)
        try:
            return await reply.wait()
        except BaseException:
            # Tell the handshake to skip what it has not started, and wait
            # (shielded) for it to settle: once this call has returned, even
            # by cancellation, kvactors no longer touches ``src`` / ``dst``.
            ticket.cancelled = True
            with anyio.CancelScope(shield=True):
                await reply.settled()
            raise

    # -- the API --------------------------------------------------------------------

    async def lookup(self, keys: Sequence[Key]) -> LookupResult:
        """How many leading ``keys`` are available, and in which tier each is.

        Raises :class:`~kvactors.errors.InvalidKeyError` for bad keys and
        :class:`~kvactors.errors.ActorClosed` after close. Cancelling it changes nothing.
        """
        self._check_open("lookup")
        message = Lookup(_check_keys(keys, "lookup"))
        await anyio.lowlevel.checkpoint()  # yield once, as every call does
        # No handshake to protect: ask the policy actor itself, which answers
        # at once when idle (no mailbox round trip through the coordinator).
        start = time.perf_counter()
        result: LookupResult = await self._coord.policy.ask(message)
        self._lookup_latency.add(time.perf_counter() - start)
        return result

    async def store(self, keys: Sequence[Key], src: Any) -> StoreResult | None:
        """Store the blocks of ``src`` under ``keys`` (keys already cached are skipped).

        Returns ``None`` when the cache cannot take them now (every block pinned
        or in flight): nothing changed. Raises :class:`~kvactors.errors.TierError`
        if the transfer failed (the blocks are then not stored). If cancelled,
        the store completes as failed, and the call returns once the transfer in
        flight (if any) has ended: ``src`` is not read afterwards.
        """
        self._check_open("store")
        keys = _check_keys(keys, "store")
        side = self._check_side(src, len(keys), "store src")
        ticket = Ticket()
        return await self._ask(DoStore(keys, side, ticket), ticket)  # type: ignore[no-any-return]

    async def load(self, keys: Sequence[Key], dst: Any, *, partial: bool = False) -> LoadResult:
        """Copy the cached blocks ``keys`` into ``dst``, promoting NVMe blocks to CPU.

        With ``partial=True`` it loads the longest leading run of keys available
        at the time of the call (a lookup and a load in one atomic step; other
        requests may evict blocks between a separate ``lookup`` and ``load``)
        and says how many in the result. Otherwise it raises
        :class:`~kvactors.errors.BlockNotFoundError` (nothing pinned) if a key
        is not available, :class:`~kvactors.errors.TierError` if a transfer
        failed. If cancelled, every pin is released, and the call returns once
        the transfer in flight (if any) has ended: ``dst`` is not written afterwards.
        """
        self._check_open("load")
        keys = _check_keys(keys, "load")
        side = self._check_side(dst, len(keys), "load dst")
        ticket = Ticket()
        return await self._ask(DoLoad(keys, side, ticket, partial), ticket)  # type: ignore[no-any-return]

    def submit_store(self, keys: Sequence[Key], src: Any) -> Future[StoreResult | None]:
        """Start :meth:`store` and return its future at once (poll ``done()``)."""
        return self._submit(self.store(keys, src))

    def submit_load(
        self, keys: Sequence[Key], dst: Any, *, partial: bool = False
    ) -> Future[LoadResult]:
        """Start :meth:`load` and return its future at once (poll ``done()``)."""
        return self._submit(self.load(keys, dst, partial=partial))

    def _submit(self, coro: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        if self._closed:
            coro.close()
            fut.set_exception(ActorClosed("submit: the cache is closed"))
            return fut

        async def run() -> None:
            try:
                fut.set_result(await coro)
            except Exception as exc:  # delivered through the future, never lost
                fut.set_exception(exc)
            except BaseException:
                fut.set_exception(ActorClosed("the cache closed before the request finished"))
                raise

        self._tg.start_soon(run)
        return fut

    def prefetch(self, keys: Sequence[Key]) -> bool:
        """Hint that ``keys`` will be loaded soon: NVMe blocks are promoted to CPU.

        Lossy: returns ``False`` (and counts it) when the coordinator's mailbox
        is full or the cache is closed. Never waits, never raises for that.
        """
        return self._coord.try_tell(DoPrefetch(_check_keys(keys, "prefetch")))

    async def events(self) -> AsyncIterator[CacheEvent]:
        """Events from now on; the stream ends when the cache closes."""
        self._check_open("events")
        stream: AsyncIterator[CacheEvent] = await self._coord.policy.ask(Subscribe())
        return stream

    async def stats(self) -> CacheStats:
        self._check_open("stats")
        snap: Snapshot = await self._coord.policy.ask(GetSnapshot())
        tiers = [self._coord.gpu, self._coord.cpu]
        if self._coord.nvme is not None:
            tiers.append(self._coord.nvme)
        actors = [self._coord.statistics(), self._coord.policy.statistics()]
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
            failed_stores=self._coord.failed_stores,
            failed_loads=self._coord.failed_loads,
            prefetch_dropped=self._coord.statistics().hints_dropped,
        )


@asynccontextmanager
async def open(config: Config | None = None) -> AsyncIterator[KVCache]:
    """Start every actor of a cache built from ``config`` (defaults when ``None``).

    On exit, in-flight requests finish, then the coordinator, the policy actor
    and the tiers stop in that order; requests still queued fail with
    :class:`~kvactors.errors.ActorClosed`. A start-up failure (say, an NVMe
    directory that cannot be created) raises :class:`~kvactors.errors.ActorStartError`.
    """
    from kvactors.media import build_media

    config = config or Config()
    gpu_m, cpu_m, nvme_m = build_media(config)
    inline = config.inline_bytes
    gpu = TierActor(
        gpu_m, threads=config.gpu.threads, mailbox_size=config.mailbox_size, inline_bytes=inline
    )
    cpu = TierActor(
        cpu_m, threads=config.cpu.threads, mailbox_size=config.mailbox_size, inline_bytes=inline
    )
    nvme = None
    if nvme_m is not None:
        assert config.nvme is not None
        nvme = TierActor(
            nvme_m, threads=config.nvme.threads, mailbox_size=config.mailbox_size, inline_bytes=0
        )
    recovered = [(e.key, e.slot) for e in nvme_m.recovered()] if nvme_m is not None else []
    policy = PolicyActor(config, recovered)
    coord = Coordinator(config, policy, gpu, cpu, nvme)
    tiers = [t for t in (gpu, cpu, nvme) if t is not None]
    order: list[Actor[Any]] = [*tiers, policy, coord]
    async with anyio.create_task_group() as tg:
        started: list[Actor[Any]] = []
        try:
            for actor in order:
                await tg.start(actor.run)
                started.append(actor)
            async with anyio.create_task_group() as user_tg:
                kv = KVCache(config, coord, user_tg)
                try:
                    yield kv
                finally:
                    kv._closed = True
        finally:
            # Dependency order: nothing new reaches the coordinator, then the
            # policy actor, then the tiers that in-flight handshakes still use.
            with anyio.CancelScope(shield=True):
                for actor in reversed(order):
                    await actor.stop()
                    if actor is coord and actor in started:
                        # In-flight handshakes still need the policy and the tiers.
                        await coord.wait_stopped()
            # A tier actor closes its medium when it stops; media of tiers that
            # never started are closed here.
            for tier in tiers:
                if tier not in started:
                    tier.medium.close()
