"""The coordinator: the actor that sequences every handshake.

Each store, load and prefetch is one message to the coordinator, handled as
``prepare -> transfers -> complete``:

1. ask the policy actor for a plan (``PrepareStore`` / ``PrepareLoad``, in
   :meth:`Coordinator._plan`);
2. run it and complete it (:meth:`~kvactors.cache.executor.Executor.run`:
   its transfers in order on the tier actors, then ``Complete`` with which of
   them succeeded, out of a cancellation's reach);
3. answer the request: a store goes round again for keys another store was
   writing; a load waits for blocks being demoted, leaves out a tier that is
   down, and (``partial``) loads the prefix before blocks that failed their
   checksum.

A shared tier (a remote store that other engines write too) is where a load
or a prefetch looks for the keys no tier holds: they are recorded there
unasked and promoted like any block, so the read itself tells which the
server has, with no round trip before it. A block it does not have (never
stored, or evicted by the server) is a miss, counted as ``missing`` (not
``corrupted``): a partial load stops before it, a full one raises
:class:`~kvactors.errors.BlockNotFoundError`; the blocks of the same read that
arrived stay promoted. A tier that fails with a
``retry_after`` (a server down) is left out for that long: a partial load
then returns what the other tiers hold.

The coordinator runs up to ``max_inflight`` handshakes at once; like every
actor it runs a handshake in the caller's task when it has a free place (see
:mod:`kvactors.actors`), and the same code through its mailbox otherwise.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

from kvactors.actors import Actor, Message, loop_checkpoints
from kvactors.cache.executor import Executor, Outcome
from kvactors.cache.messages import (
    Adopt,
    Contains,
    CoordinatorRequest,
    Discover,
    Load,
    Prefetch,
    PrepareFlush,
    PrepareLoad,
    PrepareStore,
    Store,
)
from kvactors.cache.policy_actor import PolicyActor
from kvactors.cache.results import FlushResult, Latency, LoadResult, StoreResult
from kvactors.cache.tier_actor import TierActor
from kvactors.config import Config
from kvactors.errors import BlockNotFoundError, IntegrityError, TierError, TierFailed
from kvactors.keys import Key
from kvactors.media import MemoryPool

__all__ = ["Coordinator"]

R = TypeVar("R")


class Coordinator(Actor[CoordinatorRequest]):
    """Runs handshakes; see the module docstring."""

    def __init__(
        self, config: Config, policy: PolicyActor, gpu: MemoryPool, tiers: list[TierActor]
    ) -> None:
        super().__init__(
            "coordinator", mailbox_size=config.mailbox_size, concurrency=config.max_inflight
        )
        self.policy = policy
        self.gpu = gpu
        self.executor = Executor(policy, gpu, tiers, config.move_bytes)
        self.tiers = self.executor.tiers
        self.chain = self.executor.chain
        # Tiers whose medium other engines share (it answers ``contains``).
        self.shared = [t.name for t in tiers if hasattr(t.medium, "contains")]
        # Tiers written on demotion only, written back when the cache closes:
        # (name, seconds the write-back may take at most).
        self.write_back = [
            (name, float(getattr(spec, "flush_timeout", 0.0)))
            for name, spec in config.chain()
            if getattr(spec, "write_policy", "") == "on_demotion"
            and config.write_mode != "write_through"
        ]
        self.latency = {name: Latency() for name in ("store", "load")}
        self.failed = {"store": 0, "load": 0}  # requests that raised, by kind
        # The running backend's cancel scope class, made directly (as events are
        # in the actor runtime): ``anyio.CancelScope()`` looks the backend up each time.
        self._shield: type[anyio.CancelScope] = anyio.CancelScope

    async def on_start(self) -> None:
        self._shield = self.executor.shield = type(anyio.CancelScope())
        self.executor.checkpoint_if_cancelled = loop_checkpoints()[1]

    async def handle(self, message: CoordinatorRequest) -> Any:
        call: Coroutine[Any, Any, StoreResult | LoadResult | None]
        match message:
            case Store(keys, src):
                kind, call = "store", self._store(keys, src)
            case Load(keys, dst, partial):
                kind, call = "load", self._load(keys, dst, partial)
            case Prefetch(keys):
                with contextlib.suppress(TierError):  # a hint: nothing to report
                    await self.discover(keys, fetch=True)
                    plan, waited = await self._plan(PrepareLoad(keys, prefetch=True))
                    await self.executor.run(plan, None, waited=waited)
                return None
        start = time.perf_counter()
        try:
            return await call
        except BaseException:
            self.failed[kind] += 1
            raise
        finally:
            self.latency[kind].add(time.perf_counter() - start)

    # -- the handshakes -------------------------------------------------------------

    async def _store(self, keys: list[Key], src: Any) -> StoreResult | None:
        stored = present = 0
        durable: list[Key] = []
        while True:
            plan, waited = await self._plan(PrepareStore(keys))
            if plan is None:
                return None if not stored else StoreResult(stored, present, durable)
            durable += await self.executor.run(plan, src, waited=waited)
            stored += len(plan.new)
            present += len(keys) - len(plan.new) - len(plan.busy) - plan.declined
            if not plan.busy:
                return StoreResult(stored, present, durable)
            # Keys another store was writing: once it has completed they are
            # cached (present next time round) or, if it failed, stored by us.
            for event in plan.wait:
                await event.wait()
            pos = {k: i for i, k in enumerate(keys)}
            index = [pos[k] for k in plan.busy]
            keys = plan.busy
            src = [src[i] for i in index] if isinstance(src, list) else src[index]

    async def discover(self, keys: list[Key], *, fetch: bool = False) -> None:
        """Ask each shared tier, in one batch, about the keys no tier holds, and
        record those it has. A shared tier that is down is left out (marked
        failed for its ``retry_after``); nothing is raised. With ``fetch`` (a load
        follows) they are recorded there without asking: the read asks."""
        for name in self.shared:
            missing = await self.policy.ask(Discover(name, keys, adopt=fetch))
            if not missing or fetch:
                continue
            try:
                found = await self.tiers[name].ask(Contains(missing))
            except TierFailed as exc:
                await self.executor.mark_failed(name, exc.retry_after)
                continue
            except TierError:
                continue
            held = [k for k, f in zip(missing, found) if f]
            if held:
                await self.policy.ask(Adopt(name, held))

    async def _load(self, keys: list[Key], dst: Any, partial: bool) -> LoadResult:
        if self.shared:
            await self.discover(keys, fetch=True)
        retries = 3  # a tier that fails is left out of the next plan
        while True:
            plan, waited = await self._plan(PrepareLoad(keys, partial=partial))
            if plan.wait:
                # Blocks being demoted: loaded from their new tier once they land.
                for event in plan.wait:
                    await event.wait()
                continue
            try:
                await self.executor.run(plan, dst, waited=waited)
            except TierFailed as exc:
                retries -= 1
                if not partial or exc.retry_after is None or not retries:
                    raise
                # Going on after a failure, a cancellation that came during the
                # read (in a thread, not interrupted) is taken first, as after a
                # transfer that succeeded.
                await anyio.lowlevel.checkpoint_if_cancelled()
                continue  # the tier is left out now: load what the others hold
            except IntegrityError as exc:
                if not partial:
                    where = {t for k, t in zip(plan.keys, plan.tiers) if k in set(exc.keys)}
                    if where and where <= set(self.shared):
                        # Gone from the shared server (evicted, or damaged): a miss.
                        raise BlockNotFoundError(
                            f"load: {len(exc.keys)} block(s) no longer on tier "
                            f"{sorted(where)[0]!r}: {exc.keys[:8]!r}"
                        ) from exc
                    raise
                # The bad blocks are dropped now: load the prefix before them
                # (unless the load was cancelled meanwhile, as above).
                await anyio.lowlevel.checkpoint_if_cancelled()
                bad = set(exc.keys)
                first = next((i for i, k in enumerate(plan.keys) if k in bad), len(plan.keys))
                keys = plan.keys[:first]
                if not keys:
                    return LoadResult([])
                continue
            return LoadResult(plan.tiers)

    async def _plan(self, message: Message[R]) -> tuple[R, bool]:
        """Ask the policy actor for a plan: ``(plan, waited)``. A plan, once made,
        is always run and completed (it holds pins and in-flight marks), so a
        cancellation must not land between the policy actor's reply and
        :meth:`_run`: through the mailbox the ask waits shielded (``waited``:
        :meth:`_run` then takes a pending cancellation first); handled in this
        task it has no await to be interrupted at (policy handlers never await)."""
        if self.policy.idle:
            return await self.policy.ask(message), False
        with self._shield(shield=True):
            plan = await self.policy.ask(message)
        return plan, True

    async def flush(self) -> list[FlushResult]:
        """Write the blocks still held above each tier written ``on_demotion`` into
        it (the cache is closing: nothing else would), in batches, within that
        tier's ``flush_timeout``; a block whose write failed is not tried again.
        Never raises for the tier: failures are in the result."""
        results = []
        for tier, seconds in self.write_back:
            start = time.perf_counter()
            written = failed = left = 0
            error: str | None = None
            tried: set[Key] = set()
            limit = max(1, (64 << 20) // self.gpu.block_bytes)  # about 64 MiB a batch
            with anyio.move_on_after(seconds) as scope:
                while True:
                    (plan, left), waited = await self._plan(
                        PrepareFlush(tier, limit, frozenset(tried))
                    )
                    if plan is None:
                        break
                    outcome = Outcome(len(plan.transfers))
                    try:
                        await self.executor.run(plan, None, outcome, waited)
                    finally:
                        for transfer, ok in zip(plan.transfers, outcome.done):
                            tried.update(transfer.keys)
                            if ok:
                                written += len(transfer.keys)
                            else:
                                failed += len(transfer.keys)
                        error = error or outcome.failure
            if scope.cancelled_caught:
                error = error or f"time ran out after {seconds:g} s"
            elif left:  # the tier went down: the rest was not tried
                error = error or f"tier {tier!r} is down"
            results.append(
                FlushResult(tier, written, failed, left, time.perf_counter() - start, error)
            )
        return results
