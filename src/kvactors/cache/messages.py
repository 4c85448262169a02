"""Every message of the served cache, each typed by its reply (``Message[R]``).

Three actors, three unions: the coordinator's (:data:`CoordinatorRequest`),
the policy actor's (:data:`PolicyRequest`) and a tier actor's
(:data:`TierRequest`). Plans (:class:`StorePlan`, :class:`LoadPlan`) are
ordered lists of :class:`~kvactors.cache.transfers.Transfer`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec

from kvactors.actors import Message
from kvactors.cache.events import CacheEvent
from kvactors.cache.results import LoadResult, LookupResult, Snapshot, StoreResult
from kvactors.cache.transfers import Side, Transfer
from kvactors.keys import Key

__all__ = [
    "Adopt",
    "Complete",
    "Contains",
    "CoordinatorRequest",
    "Discover",
    "Drop",
    "Forget",
    "GetSnapshot",
    "JobReport",
    "Load",
    "LoadPlan",
    "Lookup",
    "MarkFailed",
    "Move",
    "PolicyRequest",
    "Prefetch",
    "PrepareFlush",
    "PrepareLoad",
    "PrepareStore",
    "Store",
    "StorePlan",
    "Subscribe",
    "TierRequest",
]


# -- plans ------------------------------------------------------------------------


class StorePlan(msgspec.Struct, frozen=True):
    """Store ``new`` (of the request's ``keys``): run ``transfers`` in order.

    ``busy`` are keys another store is still writing: not present yet, so the
    coordinator waits for ``wait`` (that store's completion) and tries them
    again. ``pins`` is empty (a store pins nothing to read). ``declined``
    counts the keys the top tier's policy would not admit (stored nowhere).
    """

    keys: list[Key]
    new: list[Key]
    transfers: list[Transfer]
    busy: list[Key]
    wait: list[Any]  # anyio.Event of each store still writing a busy key
    pins: list[tuple[int, list[Key]]] = []
    declined: int = 0


class LoadPlan(msgspec.Struct, frozen=True):
    """Load the request's leading ``len(tiers)`` keys (``keys``): run ``transfers``
    in order; ``tiers[i]`` is where block ``i`` comes from. ``pins`` are the
    ``(tier index, keys)`` pinned for reading, unpinned when the plan completes.
    ``wait`` (then nothing else is set): blocks being demoted; the coordinator
    waits for these events and asks again."""

    keys: list[Key]
    tiers: list[str]
    transfers: list[Transfer]
    pins: list[tuple[int, list[Key]]]
    wait: list[Any] = []  # anyio.Event of each demotion a key is in


# -- the coordinator's ------------------------------------------------------------


class Store(Message[StoreResult | None], frozen=True, tag=True):
    keys: list[Key]
    src: Any  # list[int] of GPU-pool slots, or a (n, block_bytes) uint8 tensor


class Load(Message[LoadResult], frozen=True, tag=True):
    keys: list[Key]
    dst: Any
    partial: bool = False


class Prefetch(Message[None], frozen=True, tag=True):
    keys: list[Key]


CoordinatorRequest = Store | Load | Prefetch


# -- the policy actor's -----------------------------------------------------------


class Lookup(Message[LookupResult], frozen=True, tag=True):
    """The leading available keys; each key named counts as an access (once with
    the load that follows)."""

    keys: list[Key]


class PrepareStore(Message[StorePlan | None], frozen=True, tag=True):
    keys: list[Key]


class PrepareLoad(Message[LoadPlan], frozen=True, tag=True):
    """Pin ``keys`` for reading. ``prefetch=True`` plans only promotions of keys
    held below the top tier and skips absent ones; ``partial=True`` pins the
    longest leading run of available keys only."""

    keys: list[Key]
    partial: bool = False
    prefetch: bool = False


class Complete(Message[list[Key]], frozen=True, tag=True):
    """Settle a plan: ``done[i]`` says whether ``plan.transfers[i]`` completed.
    Handled whatever happened before; the reply lists the request's keys a
    durable tier now holds."""

    plan: StorePlan | LoadPlan
    done: list[bool]


class Drop(Message[list[Key]], frozen=True, tag=True):
    """Remove idle ``keys`` from ``tier`` (e.g. blocks that failed their checksum)."""

    tier: str
    keys: list[Key]
    corrupted: bool = False
    missing: bool = False  # gone from a shared tier (evicted by its server): counted apart


class MarkFailed(Message[None], frozen=True, tag=True):
    """Stop placing blocks in ``tier``: it is down. Its blocks count as absent.
    With ``retry_after``, only for that many seconds (then it is used again)."""

    tier: str
    retry_after: float | None = None


class Discover(Message[list[Key]], frozen=True, tag=True):
    """The keys among ``keys`` that no tier holds (ready or being written), for
    asking the shared tier ``tier`` about them; ``[]`` when it is down. With
    ``adopt``, they are recorded as held there at once (as :class:`Adopt` does):
    the read that follows finds out whether the server has them."""

    tier: str
    keys: list[Key]
    adopt: bool = False


class Adopt(Message[None], frozen=True, tag=True):
    """Record ``keys`` as held ready by the shared tier ``tier`` (a remote store
    found them there: another engine stored them)."""

    tier: str
    keys: list[Key]


class PrepareFlush(Message[tuple[LoadPlan | None, int]], frozen=True, tag=True):
    """Plan writing up to ``limit`` blocks that tiers above ``tier`` hold ready and
    ``tier`` (written ``on_demotion``) does not, into ``tier``, their sources
    pinned (``None`` when there are none, or ``tier`` is down), and how many
    more are left after those. Keys in ``skip`` (a flush tried them) are left out."""

    tier: str
    limit: int
    skip: frozenset[Key] = frozenset()


class Subscribe(Message[AsyncIterator[CacheEvent]], frozen=True, tag=True):
    pass


class GetSnapshot(Message[Snapshot], frozen=True, tag=True):
    pass


PolicyRequest = (
    Lookup
    | PrepareStore
    | PrepareLoad
    | Complete
    | Drop
    | MarkFailed
    | Discover
    | Adopt
    | PrepareFlush
    | Subscribe
    | GetSnapshot
)


# -- a tier actor's ---------------------------------------------------------------


class JobReport(msgspec.Struct, frozen=True):
    """What one job of a tier actor did; ``threaded``: it ran in a worker thread
    (not on the event loop)."""

    tier: str
    op: str
    blocks: int
    bytes: int
    seconds: float
    threaded: bool = False


class Move(Message[JobReport], frozen=True, tag=True):
    """Run one transfer: copy ``src``'s slots into ``dst``'s, for blocks ``keys``;
    then, in the same job, ``then`` (the load of blocks just promoted into ``dst``)."""

    src: Side
    dst: Side
    keys: list[Key]
    then: Move | None = None


class Forget(Message[None], frozen=True, tag=True):
    """Forget blocks ``keys`` in this tier's medium (index records of a write that
    failed or was cancelled, or of blocks that failed their checksum)."""

    keys: list[Key]


class Contains(Message[list[bool]], frozen=True, tag=True):
    """Which of ``keys`` a shared medium (a remote store) holds now."""

    keys: list[Key]


TierRequest = Move | Forget | Contains
