"""The coordinator: the actor that sequences every handshake.

Each store, load and prefetch is one message to the coordinator, handled as
``prepare -> transfers -> complete`` (written once, in :meth:`Coordinator._run`):

1. ask the policy actor for a plan (``PrepareStore`` / ``PrepareLoad``);
2. run its transfers in order, each on the tier actor of the medium doing the
   I/O (:func:`~kvactors.cache.transfers.runner`), the request's own side bound
   to the caller's slot ids or tensor; a promotion and the load of the blocks
   it brings up run as one job of the promoting tier (:func:`_fused`);
3. ``Complete`` the plan with which transfers succeeded, whatever happened in
   2, out of a cancellation's reach (shielded whenever completing may wait).

A failed ``store`` / ``promote`` / ``load`` transfer fails the request and
skips the rest of the plan; a failed ``demote`` or ``through`` transfer is
recorded and the plan goes on. Cancellation skips the rest of the plan too,
and a cancelled store completes as failed, so it is never served. Writes into
a tier that did not complete are forgotten by that tier's medium before the
plan completes, so no index keeps a record of them.

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
import msgspec
import torch

from kvactors.actors import Actor, Message
from kvactors.cache.messages import (
    Adopt,
    Complete,
    Contains,
    CoordinatorRequest,
    Discover,
    Drop,
    Forget,
    Load,
    LoadPlan,
    MarkFailed,
    Move,
    Prefetch,
    PrepareFlush,
    PrepareLoad,
    PrepareStore,
    Store,
    StorePlan,
)
from kvactors.cache.policy_actor import PolicyActor
from kvactors.cache.results import FlushResult, Latency, LoadResult, StoreResult
from kvactors.cache.tier_actor import TierActor
from kvactors.cache.transfers import CALLER, REQUIRED, Side, Transfer, runner
from kvactors.config import Config
from kvactors.errors import (
    ActorClosed,
    BlockNotFoundError,
    BlocksMissingError,
    IntegrityError,
    KVActorsError,
    TierError,
    TierFailed,
)
from kvactors.keys import Key
from kvactors.media import MemoryPool

__all__ = ["Coordinator"]

_NO_WAIT = contextlib.nullcontext()

R = TypeVar("R")


def _split(
    plan: LoadPlan, done: list[bool], partial: dict[int, set[Key]]
) -> tuple[LoadPlan, list[bool]]:
    """``plan`` with each transfer of ``partial`` cut in two: the blocks it
    delivered (completed) and the keys ``partial[i]`` it did not (failed)."""
    transfers: list[Transfer] = []
    flags: list[bool] = []
    for i, (t, ok) in enumerate(zip(plan.transfers, done)):
        bad = partial.get(i)
        if bad is None:
            transfers.append(t)
            flags.append(ok)
            continue
        for arrived in (True, False):
            pos = [j for j, k in enumerate(t.keys) if (k not in bad) == arrived]
            if pos:
                keys = [t.keys[j] for j in pos]
                src_ids = [t.src_ids[j] for j in pos]
                dst_ids = [t.dst_ids[j] for j in pos]
                transfers.append(Transfer(t.src, src_ids, t.dst, dst_ids, keys, t.role))
                flags.append(arrived)
    return msgspec.structs.replace(plan, transfers=transfers), flags


def _part(t: Transfer, pos: list[int]) -> Transfer:
    """The blocks at positions ``pos`` of transfer ``t``."""
    return Transfer(
        t.src,
        [t.src_ids[j] for j in pos],
        t.dst,
        [t.dst_ids[j] for j in pos],
        [t.keys[j] for j in pos],
        t.role,
    )


def _fused(plan: StorePlan | LoadPlan) -> tuple[dict[int, Transfer], dict[int, Transfer | None]]:
    """A promotion and the load of its blocks out of the tier they were promoted
    into run as one job of the promoting tier (one thread hop, not two):
    ``then[i]``: the part of a load that copies out what promote ``i`` brings up;
    ``rest[j]``: what load ``j`` still copies itself (``None``: nothing)."""
    then: dict[int, Transfer] = {}
    rest: dict[int, Transfer | None] = {}
    if not isinstance(plan, LoadPlan):
        return then, rest
    promotes = [(i, t) for i, t in enumerate(plan.transfers) if t.role == "promote"]
    if not promotes:
        return then, rest
    for j, load in enumerate(plan.transfers):
        if load.role != "load" or load.dst != CALLER:
            continue
        left = list(range(len(load.keys)))
        for i, promote in promotes:
            if i > j or promote.dst != load.src:
                continue
            up = set(promote.dst_ids)
            mine = [x for x in left if load.src_ids[x] in up]
            if mine:
                then[i] = _part(load, mine)
                left = [x for x in left if load.src_ids[x] not in up]
        if len(left) < len(load.keys):
            rest[j] = _part(load, left) if left else None
    return then, rest


class _Outcome:
    """What running a plan did: ``done[i]`` per transfer, the first error, the
    blocks that failed their checksum (``corrupted``, by tier; those of them a
    shared tier no longer had: ``missing``) and, per transfer that delivered
    some of its blocks, the keys it did not (``partial``)."""

    __slots__ = ("corrupted", "done", "error", "failure", "missing", "partial")

    def __init__(self, n: int) -> None:
        self.done = [False] * n
        self.error: BaseException | None = None
        self.failure: str | None = None  # the first failed transfer's error
        self.corrupted: dict[str, list[Key]] = {}
        self.missing: set[Key] = set()
        self.partial: dict[int, set[Key]] = {}


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
        self.tiers = {t.name: t for t in tiers}
        self.chain = [t.name for t in tiers]
        # Tiers whose medium other engines share (it answers ``contains``).
        self.shared = [t.name for t in tiers if hasattr(t.medium, "contains")]
        self.move_bytes = config.move_bytes
        # Tiers written on demotion only, written back when the cache closes:
        # (name, seconds the write-back may take at most).
        self.write_back = [
            (name, float(getattr(spec, "flush_timeout", 0.0)))
            for name, spec in config.chain()
            if getattr(spec, "write_policy", "") == "on_demotion"
            and config.write_mode != "write_through"
        ]
        self.failed_tiers: set[str] = set()
        self.latency = {name: Latency() for name in ("store", "load")}
        self.failed = {"store": 0, "load": 0}  # requests that raised, by kind
        # The running backend's cancel scope class, made directly (as events are
        # in the actor runtime): ``anyio.CancelScope()`` looks the backend up each time.
        self._shield: type[anyio.CancelScope] = anyio.CancelScope

    async def on_start(self) -> None:
        self._shield = type(anyio.CancelScope())

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
                    await self._run(plan, None, waited=waited)
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
            durable += await self._run(plan, src, waited=waited)
            stored += len(plan.new)
            present += len(keys) - len(plan.new) - len(plan.busy)
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
                await self._mark_failed(name, exc.retry_after)
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
                await self._run(plan, dst, waited=waited)
            except TierFailed as exc:
                retries -= 1
                if not partial or exc.retry_after is None or not retries:
                    raise
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
                # The bad blocks are dropped now: load the prefix before them.
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
                    outcome = _Outcome(len(plan.transfers))
                    try:
                        await self._run(plan, None, outcome, waited)
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

    async def _run(
        self,
        plan: StorePlan | LoadPlan,
        side: Any,
        outcome: _Outcome | None = None,
        waited: bool = False,
    ) -> list[Key]:
        """Run ``plan``'s transfers in order (the request's side bound to ``side``),
        then complete it; returns the durable keys, raises the first required
        transfer's error or the cancellation. ``outcome`` records what happened."""
        outcome = outcome or _Outcome(len(plan.transfers))
        try:
            if waited:
                await anyio.lowlevel.checkpoint_if_cancelled()
            then, rest = _fused(plan)
            for i, transfer in enumerate(plan.transfers):
                if i in rest:
                    left = rest[i]
                    if left is None:  # copied out by the promotions before it
                        outcome.done[i] = True
                        continue
                    transfer = left
                try:
                    threaded = await self._move(transfer, side, then.get(i))
                except IntegrityError as exc:
                    outcome.corrupted.setdefault(transfer.src, []).extend(exc.keys)
                    if isinstance(exc, BlocksMissingError):
                        outcome.missing.update(exc.missing)
                        if transfer.role == "promote":
                            # Read into host slots: the blocks that arrived are whole.
                            outcome.partial[i] = set(exc.keys)
                    if transfer.role in REQUIRED:
                        raise
                except TierError as exc:
                    outcome.failure = outcome.failure or str(exc)
                    if transfer.role in REQUIRED:
                        raise
                else:
                    outcome.done[i] = True
                    if threaded:
                        # A thread's copy is not interrupted: a cancellation that
                        # came meanwhile takes effect here, before the next step.
                        await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException as exc:
            outcome.error = exc
            raise
        finally:
            # Completing is never cancelled half-way: shielded whenever it may
            # wait. It cannot when every transfer succeeded and the policy actor
            # answers in this task (policy handlers never await): then it runs
            # to its end with no await to be interrupted at, and needs no shield.
            with _NO_WAIT if self._at_once(outcome) else self._shield(shield=True):
                durable = await self._complete(plan, outcome)
        return durable

    def _at_once(self, outcome: _Outcome) -> bool:
        """Whether completing a plan that ran as ``outcome`` says has no await that
        suspends: nothing failed, nothing to forget or drop, the policy actor free."""
        return (
            outcome.error is None
            and not outcome.corrupted
            and False not in outcome.done
            and self.policy.idle
        )

    async def _complete(self, plan: StorePlan | LoadPlan, outcome: _Outcome) -> list[Key]:
        """Settle a plan (shielded by the caller): forget writes that did not
        complete, drop blocks that failed their checksum, then ``Complete``."""
        done = outcome.done
        if outcome.partial and isinstance(plan, LoadPlan):
            plan, done = _split(plan, done, outcome.partial)
        if isinstance(plan, StorePlan) and outcome.error is not None:
            # A store that failed or was cancelled is never served, even if its
            # bytes reached a tier; its demotions stand.
            done = [ok and t.role == "demote" for t, ok in zip(plan.transfers, done)]
        for transfer, ok in zip(plan.transfers, done):
            if not ok and transfer.dst in self.tiers:
                with contextlib.suppress(KVActorsError):
                    await self.tiers[transfer.dst].ask(Forget(transfer.keys))
        durable = await self.policy.ask(Complete(plan, done))
        for tier, keys in outcome.corrupted.items():
            gone = [k for k in keys if k in outcome.missing]
            bad = [k for k in keys if k not in outcome.missing] if gone else keys
            if bad:
                if tier in self.tiers:
                    with contextlib.suppress(KVActorsError):
                        await self.tiers[tier].ask(Forget(bad))
                await self.policy.ask(Drop(tier, bad, corrupted=True))
            if gone:  # nothing to delete: the shared tier's server has no value for them
                await self.policy.ask(Drop(tier, gone, missing=True))
        return durable

    # -- one transfer -----------------------------------------------------------------

    def _side(self, name: str, ids: list[int], side: Any) -> Side:
        if name != CALLER:
            return Side(name, ids, self.tiers[name].medium, None)
        if side is None:  # move_bytes=False: nothing to bind
            return Side(CALLER, ids, None, None)
        if isinstance(side, torch.Tensor):
            return Side("tensor", ids, None, side if ids == list(range(len(side))) else None)
        # Slot ids of the GPU pool: the caller's positions ``ids`` name them.
        slots = side if len(ids) == len(side) else [side[i] for i in ids]
        return Side("gpu", slots, self.gpu, None)

    async def _move(self, transfer: Transfer, side: Any, then: Transfer | None = None) -> bool:
        """Run one transfer on its tier actor (and ``then``, the load of the blocks
        it promotes, in the same job); returns whether it ran in a thread."""
        src = self._side(transfer.src, transfer.src_ids, side)
        dst = self._side(transfer.dst, transfer.dst_ids, side)
        out = None
        if then is not None:
            top = self._side(then.src, then.src_ids, side)
            # Straight into the rows of the caller's tensor at those positions.
            if isinstance(side, torch.Tensor):
                out = Move(top, Side("tensor", then.dst_ids, None, side), then.keys)
            else:
                out = Move(top, self._side(CALLER, then.dst_ids, side), then.keys)
        copy_back = False
        if src.name == "tensor" and src.rows is None:
            # Some rows of the caller's tensor: a copy of them, then positions 0..n-1.
            index = torch.tensor(src.ids, dtype=torch.long, device=side.device)
            src.rows = side.index_select(0, index)
            src.ids = list(range(len(src.ids)))
        if dst.name == "tensor" and dst.rows is None and self.move_bytes:
            # Into some rows of the caller's tensor: through a buffer, copied there after.
            dst.rows = torch.empty((len(dst.ids), self.gpu.block_bytes), dtype=torch.uint8)
            dst.ids = list(range(len(dst.ids)))
            copy_back = True
        tier = self.tiers[runner(transfer, self.chain)]
        try:
            report = await tier.ask(Move(src, dst, transfer.keys, out))
        except (ActorClosed, TierFailed) as exc:
            retry = exc.retry_after if isinstance(exc, TierFailed) else None
            await self._mark_failed(tier.name, retry)
            if isinstance(exc, TierFailed):
                raise
            raise TierFailed(f"tier {tier.name!r} is down") from exc
        if copy_back:
            assert dst.rows is not None
            index = torch.tensor(transfer.dst_ids, dtype=torch.long, device=side.device)
            side[index] = dst.rows.to(side.device)
        return report.threaded

    async def _mark_failed(self, name: str, retry_after: float | None) -> None:
        """Tell the policy actor that tier ``name`` is down (for ``retry_after`` s)."""
        if retry_after is None and name in self.failed_tiers:
            return
        if retry_after is None:
            self.failed_tiers.add(name)
        with anyio.CancelScope(shield=True):
            await self.policy.ask(MarkFailed(name, retry_after))
