"""Replaying a trace: through one manager, through the served cache, and Belady's MIN.

A request is the list of its block keys. Replaying it through one
:class:`~kvactors.manager.OffloadingManager` is the handshake a serving engine
runs: ``hits = lookup(blocks)``, ``touch(blocks)``, then ``prepare_store(blocks)``
and ``complete_store`` of the keys it returned (``None`` stores nothing: the
request's blocks to store do not fit beside its present ones, which for a
policy that stores every missing block means it has more blocks than the
tier). The block hit ratio is the sum of hits over the sum of ``len(blocks)``.

:func:`belady` runs the offline optimum on the same accesses: every request
accesses all its blocks; a request that fits stores its missing blocks,
evicting the resident blocks not in the request whose next access is
farthest (never-again first; on ties the block deeper in its request). Hits
are counted as for the manager, as the number of *leading* resident blocks.
On traces of chained prefix hashes this is an upper bound of the hit ratio of
every policy that stores every missing block (not of one that declines
stores, such as ``prefix_admit``); on other traces it need not be (see
``docs/replay.md``).

:func:`replay_served` replays the same requests through the served cache
(``kvactors.open``: the coordinator, the policy actor and a CPU tier actor),
as a serving engine drives it: ``load(blocks, partial=True)`` of the leading
blocks available, then ``store(blocks)``. With ``move_bytes=False`` no byte
moves; with ``True`` every block is copied in and out of a real CPU pool.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import msgspec

from kvactors.cli.report import progress
from kvactors.cli.stopping import run_async
from kvactors.config import Config, TierConfig
from kvactors.errors import ConfigError
from kvactors.keys import Key, check_keys
from kvactors.manager import OffloadingManager

__all__ = [
    "BLOCK_TOKENS",
    "SERVED_BLOCK_BYTES",
    "ReplayResult",
    "belady",
    "gap_share",
    "handshake",
    "replay",
    "replay_served",
]

BLOCK_TOKENS = 512
"""Tokens per block in the Mooncake traces (reported in the manager's events only)."""


class ReplayResult(msgspec.Struct, frozen=True):
    """The outcome of replaying one trace with one policy (or ``"belady"``).

    ``hits`` counts leading hits. ``stores_refused`` counts requests whose
    store was refused (``prepare_store`` returned ``None``): for a policy that
    stores every missing block (and MIN), the requests with more blocks than
    ``capacity``; ``prefix_admit`` still stores the blocks it admits of such a
    request when they fit beside its present ones. ``resident_hits`` (MIN
    only, ``None`` for policies) counts every block of a request found
    resident, leading or not.
    """

    policy: str
    capacity: int
    requests: int
    accesses: int
    hits: int
    stores_refused: int
    evictions: int
    resident_hits: int | None = None

    @property
    def hit_ratio(self) -> float:
        """Hits over block accesses (0.0 for an empty trace)."""
        return self.hits / self.accesses if self.accesses else 0.0


def handshake(
    manager: OffloadingManager,
    requests: Sequence[Sequence[Key]],
    *,
    show_progress: bool | None = False,
    label: str = "replay",
) -> tuple[int, int]:
    """Run every request through ``manager``; return ``(hits, stores refused)``.

    Per request: ``lookup``, ``touch``, ``prepare_store`` and ``complete_store``
    of the keys it returned. This loop is what ``kvactors bench policy`` times.
    """
    lookup = manager.lookup
    touch = manager.touch
    prepare_store = manager.prepare_store
    complete_store = manager.complete_store
    hits = 0
    refused = 0
    for blocks in progress(requests, len(requests), label, enabled=show_progress):
        hits += lookup(blocks)
        touch(blocks)
        out = prepare_store(blocks)
        if out is None:
            refused += 1
        else:
            complete_store(out.block_hashes_to_store)
    return hits, refused


def replay(
    requests: Sequence[Sequence[Key]],
    policy: str,
    capacity: int,
    *,
    show_progress: bool | None = False,
) -> ReplayResult:
    """Replay ``requests`` in order through a manager of ``capacity`` blocks using ``policy``.

    ``show_progress=None`` shows a bar on a terminal's stderr. Raises
    :class:`~kvactors.errors.ConfigError` for ``capacity <= 0``,
    :class:`~kvactors.errors.UnknownPolicyError` for an unknown policy and
    :class:`~kvactors.errors.InvalidKeyError` for a request naming a key twice.
    """
    manager = OffloadingManager(capacity, block_size=BLOCK_TOKENS, policy=policy)
    hits, refused = handshake(manager, requests, show_progress=show_progress, label=policy)
    return ReplayResult(
        policy=manager.policy_name,
        capacity=capacity,
        requests=len(requests),
        accesses=sum(map(len, requests)),
        hits=hits,
        stores_refused=refused,
        evictions=manager.stats().evictions,
    )


SERVED_BLOCK_BYTES = 64
"""Bytes per block of ``replay --served --bytes``: real copies, small enough for any trace."""


async def _served(
    requests: Sequence[Sequence[Key]],
    policy: str,
    capacity: int,
    move_bytes: bool,
    show_progress: bool | None,
) -> tuple[int, int, int, int]:
    import torch

    import kvactors

    bb = SERVED_BLOCK_BYTES
    config = Config(
        block_bytes=bb,
        cpu=TierConfig(num_blocks=capacity, policy=policy),
        nvme=None,
        move_bytes=move_bytes,
    )
    hits = refused = declined = 0
    async with kvactors.open(config) as kv:
        label = f"{policy} (served)"
        for blocks in progress(requests, len(requests), label, enabled=show_progress):
            keys = list(blocks)
            if not keys:
                continue  # a request shorter than one block: nothing to look up or store
            side = torch.zeros((len(keys), bb), dtype=torch.uint8) if move_bytes else None
            found = len((await kv.load(keys, side, partial=True)).tiers)
            hits += found
            out = await kv.store(keys, side)
            if out is None:
                refused += 1
            else:
                # Keys neither stored nor present: the policy declined them.
                declined += len(keys) - out.stored - out.present
        stats = (await kv.stats()).policy.tiers["cpu"]
    return hits, refused, stats.evictions, declined


def replay_served(
    requests: Sequence[Sequence[Key]],
    policy: str,
    capacity: int,
    *,
    move_bytes: bool = False,
    show_progress: bool | None = False,
) -> ReplayResult:
    """Replay ``requests`` through the served cache (``kvactors.open``) with a CPU tier
    of ``capacity`` blocks under ``policy``, and no NVMe tier.

    Per request: ``load(blocks, partial=True)`` (its leading available blocks
    are the hits), then ``store(blocks)`` (``None`` counts as a refused store).
    ``move_bytes=True`` copies every block (64 bytes each) through a real CPU
    pool; ``False`` runs the same handshakes with no bytes. Raises
    :class:`~kvactors.errors.ConfigError` for ``capacity <= 0`` or an unknown
    policy (as ``Config`` does).
    """
    if type(capacity) is not int or capacity <= 0:
        raise ConfigError(f"capacity must be a positive int, got {capacity!r}")
    hits, refused, evictions, _ = run_async(
        _served, requests, policy, capacity, move_bytes, show_progress
    )
    return ReplayResult(
        policy=policy,
        capacity=capacity,
        requests=len(requests),
        accesses=sum(map(len, requests)),
        hits=hits,
        stores_refused=refused,
        evictions=evictions,
    )


def gap_share(hits: int, lru_hits: int, min_hits: int) -> float | None:
    """The share of the LRU -> MIN gap that ``hits`` closes (``None`` when there is no gap).

    0 is LRU, 1 is MIN; below 0 is worse than LRU.
    """
    gap = min_hits - lru_hits
    return (hits - lru_hits) / gap if gap > 0 else None


def _next_uses(requests: Sequence[Sequence[Key]]) -> list[list[int]]:
    """For each request, the index of the next request accessing each of its blocks.

    ``len(requests)`` stands for "never again". Raises ``InvalidKeyError`` for
    the first request naming a key that is not ``bytes``/``int`` (as
    :func:`replay` does) or naming one twice.
    """
    for r, blocks in enumerate(requests):
        check_keys(blocks, f"request {r}")
    n = len(requests)
    out: list[list[int]] = [[] for _ in range(n)]
    last: dict[Key, int] = {}
    get = last.get
    for r in range(n - 1, -1, -1):
        blocks = requests[r]
        out[r] = [get(key, n) for key in blocks]
        for key in blocks:
            last[key] = r
    return out


def belady(
    requests: Sequence[Sequence[Key]],
    capacity: int,
    *,
    show_progress: bool | None = False,
) -> ReplayResult:
    """Belady's MIN on ``requests`` with ``capacity`` blocks, hits counted as leading blocks.

    Runs in O(A log A) for A block accesses: next uses are precomputed, and
    the eviction order is a heap of ``(next use, depth)`` entries with lazy
    deletion (an entry is live while it matches the block's current next use).
    Raises :class:`~kvactors.errors.ConfigError` for ``capacity <= 0`` and
    :class:`~kvactors.errors.InvalidKeyError` for a request naming a key that
    is not ``bytes``/``int`` (a ``str``, a ``bool``) or naming one twice, as
    :func:`replay` does.
    """
    if type(capacity) is not int or capacity <= 0:
        raise ConfigError(f"capacity must be a positive int, got {capacity!r}")
    next_uses = _next_uses(requests)
    # key -> next use of the resident block; the heap holds (-next use, -depth, seq, key).
    resident: dict[Key, int] = {}
    heap: list[tuple[int, int, int, Key]] = []
    push, pop = heapq.heappush, heapq.heappop
    seq = 0
    hits = resident_hits = accesses = refused = evictions = 0
    indexed = progress(range(len(requests)), len(requests), "belady (MIN)", enabled=show_progress)
    for r in indexed:
        blocks = requests[r]
        uses = next_uses[r]
        accesses += len(blocks)
        for key in blocks:
            if key not in resident:
                break
            hits += 1
        missing: list[int] = []
        for i, key in enumerate(blocks):
            if key in resident:
                resident[key] = uses[i]
                push(heap, (-uses[i], -i, seq, key))
                seq += 1
            else:
                missing.append(i)
        resident_hits += len(blocks) - len(missing)
        if len(blocks) > capacity:
            refused += 1
            continue
        need = len(resident) + len(missing) - capacity
        if need > 0:
            current = set(blocks)
            held: list[tuple[int, int, int, Key]] = []
            while need:
                entry = pop(heap)
                key = entry[3]
                if resident.get(key) != -entry[0]:
                    continue  # stale: the block was used again or evicted since
                if key in current:
                    held.append(entry)
                    continue
                del resident[key]
                need -= 1
                evictions += 1
            for entry in held:
                push(heap, entry)
        for i in missing:
            key = blocks[i]
            resident[key] = uses[i]
            push(heap, (-uses[i], -i, seq, key))
            seq += 1
        if len(heap) > 4 * len(resident) + 4096:
            heap = [e for e in heap if resident.get(e[3]) == -e[0]]
            heapq.heapify(heap)
    return ReplayResult(
        policy="belady",
        capacity=capacity,
        requests=len(requests),
        accesses=accesses,
        hits=hits,
        stores_refused=refused,
        evictions=evictions,
        resident_hits=resident_hits,
    )
