"""Running a plan: its transfers in order on the tier actors, then its completion.

The coordinator hands every plan the policy actor makes to :meth:`Executor.run`
(written once, for stores, loads, prefetches and write-backs):

1. each transfer in order runs on the tier actor of the medium doing the I/O
   (:func:`~kvactors.cache.transfers.runner`), the request's own side bound to
   the caller's slot ids or tensor; a promotion and the load of the blocks it
   brings up run as one job of the promoting tier (:func:`_fused`);
2. the plan is settled with which transfers succeeded, whatever happened in 1,
   out of a cancellation's reach (shielded whenever completing may wait):
   writes into a tier that did not complete are forgotten by that tier's
   medium, blocks that failed their checksum dropped, then ``Complete``.

A failed ``store`` / ``promote`` / ``load`` transfer fails the request and
skips the rest of the plan; a failed ``demote`` or ``through`` transfer is
recorded and the plan goes on. Cancellation skips the rest of the plan too,
and a cancelled store completes as failed, so it is never served. A tier
actor that is closed or whose medium fails with
:class:`~kvactors.errors.TierFailed` is reported down to the policy actor
(for the error's ``retry_after``), so later plans leave it out.
"""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import torch

from kvactors.actors import Checkpoint
from kvactors.cache.messages import Complete, Drop, Forget, LoadPlan, MarkFailed, Move, StorePlan
from kvactors.cache.policy_actor import PolicyActor
from kvactors.cache.tier_actor import TierActor
from kvactors.cache.transfers import CALLER, REQUIRED, Side, Transfer, runner
from kvactors.errors import (
    ActorClosed,
    BlocksMissingError,
    IntegrityError,
    KVActorsError,
    TierError,
    TierFailed,
)
from kvactors.keys import Key
from kvactors.media import MemoryPool

__all__ = ["Executor", "Outcome"]

_NO_WAIT = contextlib.nullcontext()

OVERLAP_BYTES = 1 << 20
"""A store of at least this many bytes from host memory runs beside the
``through`` write after it (see :meth:`Executor._overlap`)."""


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


class Outcome:
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


class Executor:
    """Runs plans on the tier actors and settles them with the policy actor;
    see the module docstring. Owned by the coordinator, used from its handlers."""

    def __init__(
        self, policy: PolicyActor, gpu: MemoryPool, tiers: list[TierActor], move_bytes: bool
    ) -> None:
        self.policy = policy
        self.gpu = gpu
        self.tiers = {t.name: t for t in tiers}
        self.chain = [t.name for t in tiers]
        self.move_bytes = move_bytes
        self.failed_tiers: set[str] = set()
        # The running backend's cancel scope class, made directly (as events are
        # in the actor runtime): ``anyio.CancelScope()`` looks the backend up
        # each time; and its ``checkpoint_if_cancelled``, looked up once. Set by
        # the coordinator once its event loop runs.
        self.shield: type[anyio.CancelScope] = anyio.CancelScope
        self.checkpoint_if_cancelled: Checkpoint = anyio.lowlevel.checkpoint_if_cancelled

    async def run(
        self,
        plan: StorePlan | LoadPlan,
        side: Any,
        outcome: Outcome | None = None,
        waited: bool = False,
    ) -> list[Key]:
        """Run ``plan``'s transfers in order (the request's side bound to ``side``),
        then complete it; returns the durable keys, raises the first required
        transfer's error or the cancellation. ``outcome`` records what happened."""
        outcome = outcome or Outcome(len(plan.transfers))
        try:
            if waited:
                await anyio.lowlevel.checkpoint_if_cancelled()
            then, rest = _fused(plan)
            overlap = self._overlap(plan, side)
            for i, transfer in enumerate(plan.transfers):
                if i in rest:
                    left = rest[i]
                    if left is None:  # copied out by the promotions before it
                        outcome.done[i] = True
                        continue
                    transfer = left
                if i in overlap:
                    await self._overlapped(plan, i, overlap[i], side, outcome)
                elif i - 1 not in overlap:  # else it ran beside the store before it
                    await self._step(i, transfer, side, outcome, then.get(i))
        except BaseException as exc:
            outcome.error = exc
            raise
        finally:
            # Completing is never cancelled half-way: shielded whenever it may
            # wait. It cannot when every transfer succeeded and the policy actor
            # answers in this task (policy handlers never await): then it runs
            # to its end with no await to be interrupted at, and needs no shield.
            with _NO_WAIT if self._at_once(outcome) else self.shield(shield=True):
                durable = await self._complete(plan, outcome)
        return durable

    async def _step(
        self,
        i: int,
        transfer: Transfer,
        side: Any,
        outcome: Outcome,
        then: Transfer | None = None,
        src: Side | None = None,
    ) -> None:
        """Run transfer ``i`` of a plan and record it in ``outcome``; raises the
        error of a required one (a failed ``demote`` / ``through`` is recorded)."""
        try:
            threaded = await self._move(transfer, side, then, src)
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
                await self.checkpoint_if_cancelled()

    def _overlap(self, plan: StorePlan | LoadPlan, side: Any) -> dict[int, Side]:
        """The stores of ``plan`` whose ``through`` write (the transfer right after
        each, from the tier just stored into) may run beside them, reading the
        request's own rows instead of the slots being filled: where those rows
        are in host memory, the store moves at least :data:`OVERLAP_BYTES` and
        the written medium takes any host buffer (``writes_any_buffer``: the
        remote store; files keep reading the top tier's aligned slots).
        Maps the store's index to the ``through`` write's source."""
        if (
            len(plan.transfers) < 2
            or not isinstance(plan, StorePlan)
            or not self.move_bytes
            or side is None
        ):
            return {}
        rows = side if isinstance(side, torch.Tensor) else self.gpu.tensor()
        if rows.device.type != "cpu":
            return {}
        found: dict[int, Side] = {}
        transfers = plan.transfers
        for i, store in enumerate(transfers[:-1]):
            through = transfers[i + 1]
            if (
                store.role != "store"
                or through.role != "through"
                or through.src != store.dst
                or not getattr(self.tiers[through.dst].medium, "writes_any_buffer", False)
                or len(store.keys) * self.gpu.block_bytes < OVERLAP_BYTES
            ):
                continue
            at = dict(zip(store.dst_ids, store.src_ids))  # top-tier slot -> request position
            positions = [at[slot] for slot in through.src_ids]
            found[i] = self._side(CALLER, positions, side, in_place=True)
        return found

    async def _overlapped(
        self, plan: StorePlan | LoadPlan, i: int, src: Side, side: Any, outcome: Outcome
    ) -> None:
        """Store ``i`` and the ``through`` write after it at once: the write reads
        the request's rows (``src``, the same bytes the store copies) while the
        store copies them into the top tier, each on its own tier actor. Both have
        ended when this returns; the store's error, if any, is raised then."""
        failed: list[Exception] = []  # the store's error first, then the write's

        async def store() -> None:
            try:
                await self._step(i, plan.transfers[i], side, outcome)
            except Exception as exc:  # raised below, once the write has ended too
                failed.insert(0, exc)

        async with anyio.create_task_group() as tg:
            # The write first: its thread is busy with the server while the
            # store's copy runs (on the event loop, or a thread of its own).
            tg.start_soon(store)
            try:
                await self._step(i + 1, plan.transfers[i + 1], side, outcome, src=src)
            except Exception as exc:  # not a tier's error (those are recorded): a bug
                failed.append(exc)
        if failed:
            raise failed[0]

    def _at_once(self, outcome: Outcome) -> bool:
        """Whether completing a plan that ran as ``outcome`` says has no await that
        suspends: nothing failed, nothing to forget or drop, the policy actor free."""
        return (
            outcome.error is None
            and not outcome.corrupted
            and False not in outcome.done
            and self.policy.idle
        )

    async def _complete(self, plan: StorePlan | LoadPlan, outcome: Outcome) -> list[Key]:
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

    def _side(self, name: str, ids: list[int], side: Any, *, in_place: bool = False) -> Side:
        """One end of a transfer: tier ``name``'s slots ``ids``, or the caller's
        rows at positions ``ids``: the GPU-pool slots named there, or rows of the
        caller's tensor, read or written in place where ``in_place`` (positions in
        any order) or where ``ids`` are all its rows, else through a copy that
        :meth:`_move` makes."""
        if name != CALLER:
            return Side(name, ids, self.tiers[name].medium, None)
        if side is None:  # move_bytes=False: nothing to bind
            return Side(CALLER, ids, None, None)
        if isinstance(side, torch.Tensor):
            whole = in_place or ids == list(range(len(side)))
            return Side("tensor", ids, None, side if whole else None)
        # Slot ids of the GPU pool: the caller's positions ``ids`` name them.
        slots = side if not in_place and len(ids) == len(side) else [side[i] for i in ids]
        return Side("gpu", slots, self.gpu, None)

    async def _move(
        self,
        transfer: Transfer,
        side: Any,
        then: Transfer | None = None,
        source: Side | None = None,
    ) -> bool:
        """Run one transfer on its tier actor (and ``then``, the load of the blocks
        it promotes, in the same job; from ``source`` instead of its own source,
        when given); returns whether it ran in a thread."""
        src = source or self._side(transfer.src, transfer.src_ids, side)
        dst = self._side(transfer.dst, transfer.dst_ids, side)
        out = None
        if then is not None:
            top = self._side(then.src, then.src_ids, side)
            # Straight into the caller's rows at those positions.
            out = Move(top, self._side(CALLER, then.dst_ids, side, in_place=True), then.keys)
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
            await self.mark_failed(tier.name, retry)
            if isinstance(exc, TierFailed):
                raise
            raise TierFailed(f"tier {tier.name!r} is down") from exc
        if copy_back:
            assert dst.rows is not None
            index = torch.tensor(transfer.dst_ids, dtype=torch.long, device=side.device)
            side[index] = dst.rows.to(side.device)
        return report.threaded

    async def mark_failed(self, name: str, retry_after: float | None) -> None:
        """Tell the policy actor that tier ``name`` is down (for ``retry_after`` s)."""
        if retry_after is None and name in self.failed_tiers:
            return
        if retry_after is None:
            self.failed_tiers.add(name)
        with anyio.CancelScope(shield=True):
            await self.policy.ask(MarkFailed(name, retry_after))
