"""``kvactors replay``: the hit ratio of each eviction policy on a trace, beside Belady's MIN.

A request is the list of its block keys. Replaying it through one
:class:`~kvactors.manager.OffloadingManager` is the handshake a serving engine
runs: ``hits = lookup(blocks)``, ``touch(blocks)``, then ``prepare_store(blocks)``
and ``complete_store`` of the keys it returned (``None`` stores nothing: the
request has more blocks than the tier). The block hit ratio is the sum of hits
over the sum of ``len(blocks)``.

:func:`belady` runs the offline optimum on the same accesses: every request
accesses all its blocks; a request that fits stores its missing blocks,
evicting the resident blocks not in the request whose next access is
farthest (never-again first; on ties the block deeper in its request). Hits
are counted as for the manager, as the number of *leading* resident blocks.
On traces of chained prefix hashes this is an upper bound of every policy's
hit ratio; on other traces it need not be (see ``docs/replay.md``).
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
import time
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import msgspec

from kvactors.cli.report import COUNT, RATIO, Report, progress
from kvactors.errors import ConfigError, InvalidKeyError
from kvactors.keys import Key
from kvactors.manager import OffloadingManager
from kvactors.policy import POLICIES
from kvactors.traces import BUNDLED_TRACES, bundled_trace, load_trace

__all__ = [
    "BLOCK_TOKENS",
    "DEFAULT_CAPACITY",
    "ReplayResult",
    "add_arguments",
    "belady",
    "capacity_blocks",
    "handshake",
    "replay",
    "resolve_trace",
    "run",
]

BLOCK_TOKENS = 512
"""Tokens per block in the Mooncake traces (reported in the manager's events only)."""

DEFAULT_CAPACITY = Fraction(1, 10)
"""Capacity when neither ``--blocks`` nor ``--capacity`` is given: 10% of the unique blocks."""


class ReplayResult(msgspec.Struct, frozen=True):
    """The outcome of replaying one trace with one policy (or ``"belady"``).

    ``hits`` counts leading hits. ``stores_refused`` counts requests whose
    missing blocks were not stored because the request has more blocks than
    ``capacity``. ``resident_hits`` (MIN only, ``None`` for policies) counts
    every block of a request found resident, leading or not.
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


def _next_uses(requests: Sequence[Sequence[Key]]) -> list[list[int]]:
    """For each request, the index of the next request accessing each of its blocks.

    ``len(requests)`` stands for "never again". Raises ``InvalidKeyError`` for a
    request that names a key twice.
    """
    n = len(requests)
    out: list[list[int]] = [[] for _ in range(n)]
    last: dict[Key, int] = {}
    get = last.get
    for r in range(n - 1, -1, -1):
        blocks = requests[r]
        if len(set(blocks)) != len(blocks):
            seen: set[Key] = set()
            for key in blocks:
                if key in seen:
                    raise InvalidKeyError(f"request {r}: block key {key!r} is named twice")
                seen.add(key)
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
    :class:`~kvactors.errors.InvalidKeyError` for a request naming a key twice.
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


def capacity_blocks(unique_blocks: int, *, blocks: int | None, fraction: Fraction | None) -> int:
    """The tier size: ``blocks`` if given, else ``floor(fraction * unique_blocks)``.

    ``fraction`` defaults to :data:`DEFAULT_CAPACITY` and is exact (a
    :class:`~fractions.Fraction`), so ``0.29`` of 100 blocks is 29, not 28.
    Raises :class:`~kvactors.errors.ConfigError` naming ``--blocks`` or
    ``--capacity`` when the result is not a positive number of blocks.
    """
    if blocks is not None:
        if blocks <= 0:
            raise ConfigError(f"--blocks must be a positive int, got {blocks}")
        return blocks
    frac = DEFAULT_CAPACITY if fraction is None else fraction
    n = math.floor(frac * unique_blocks)
    if n <= 0:
        raise ConfigError(
            f"--capacity {float(frac):g} of {unique_blocks:,} unique blocks is {n} blocks; "
            "it must give at least 1"
        )
    return n


def resolve_trace(name: str | None) -> Path:
    """The trace file for a ``TRACE`` argument.

    ``None`` is the bundled conversation trace; a bundled name
    (``conversation``, ``synthetic``) is that trace unless a file of that name
    exists; anything else is a path.
    """
    if name is None:
        return bundled_trace("conversation")
    if name in BUNDLED_TRACES and not os.path.exists(name):
        return bundled_trace(name)
    return Path(name)


def parse_fraction(text: str) -> Fraction:
    """argparse type of ``--capacity``: an exact fraction in (0, 1], such as ``0.1`` or ``1/8``."""
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a fraction: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type of ``--blocks`` and ``--repeat``: a positive int."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an int: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def add_capacity_arguments(parser: argparse.ArgumentParser) -> None:
    """``--blocks N`` or ``--capacity FRACTION`` (default 0.1), shared with ``bench policy``."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--blocks", type=positive_int, metavar="N", help="tier size in blocks")
    group.add_argument(
        "--capacity",
        type=parse_fraction,
        metavar="FRACTION",
        help="tier size as a fraction of the trace's unique blocks, rounded down (default: 0.1)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``kvactors replay``."""
    parser.add_argument(
        "trace",
        nargs="?",
        metavar="TRACE",
        help="a Mooncake JSONL trace, or the name of a bundled one "
        f"({', '.join(BUNDLED_TRACES)}; default: conversation)",
    )
    parser.add_argument(
        "--policy",
        choices=[*POLICIES, "all"],
        default="all",
        help="eviction policy to replay (default: all)",
    )
    add_capacity_arguments(parser)


def run(args: argparse.Namespace) -> Report:
    """Run ``kvactors replay``; raises the trace's or the capacity's typed error."""
    path = resolve_trace(args.trace)
    trace = load_trace(path)
    requests = [request.hash_ids for request in trace]
    unique = len({key for blocks in requests for key in blocks})
    capacity = capacity_blocks(unique, blocks=args.blocks, fraction=args.capacity)
    show: bool | None = False if args.json else None
    names = list(POLICIES) if args.policy == "all" else [args.policy]

    bound = belady(requests, capacity, show_progress=show)
    results: dict[str, tuple[ReplayResult, float]] = {}
    for name in names:
        start = time.perf_counter()
        result = replay(requests, name, capacity, show_progress=show)
        results[name] = (result, time.perf_counter() - start)

    def of_bound(result: ReplayResult) -> float | None:
        return result.hits / bound.hits if bound.hits else None

    rows: list[list[object]] = [
        [
            name,
            result.hits,
            result.hit_ratio,
            bound.hit_ratio,
            of_bound(result),
            result.stores_refused,
            result.evictions,
        ]
        for name, (result, _) in results.items()
    ]
    accesses = bound.accesses
    fraction: float | None = None
    if args.blocks is not None:
        size = f"--blocks {capacity:,}"
    else:
        fraction = float(DEFAULT_CAPACITY if args.capacity is None else args.capacity)
        size = f"--capacity {fraction:g} of {unique:,} unique blocks"
    notes = [
        f"trace: {path} ({len(requests):,} requests, {accesses:,} block accesses)",
        f"capacity: {capacity:,} blocks ({size})",
        f"MIN bound: Belady's offline MIN on the same accesses, {bound.hits:,} hits; "
        "'of MIN' is a policy's hits over MIN's.",
        "hits count the leading blocks of a request found ready (prefix hits), "
        "for the policies and MIN alike.",
    ]
    if bound.hits != bound.resident_hits:
        notes.append(
            f"this trace is not prefix-closed: MIN finds {bound.resident_hits:,} blocks "
            "resident but only the leading ones count; the bound may not hold."
        )
    if bound.stores_refused:
        notes.append(
            f"{bound.stores_refused:,} requests have more blocks than the capacity and "
            "store nothing (stores refused); MIN is then not guaranteed to be a bound."
        )
    summary: dict[str, object] = {
        "command": "replay",
        "trace": str(path),
        "requests": len(requests),
        "block_accesses": accesses,
        "unique_blocks": unique,
        "capacity_blocks": capacity,
        "capacity_fraction": fraction,
        "belady": {
            "hits": bound.hits,
            "resident_hits": bound.resident_hits,
            "hit_ratio": bound.hit_ratio,
            "stores_refused": bound.stores_refused,
            "evictions": bound.evictions,
        },
        "policies": {
            name: {
                "hits": result.hits,
                "hit_ratio": result.hit_ratio,
                "of_belady": of_bound(result),
                "stores_refused": result.stores_refused,
                "evictions": result.evictions,
                "seconds": seconds,
            }
            for name, (result, seconds) in results.items()
        },
    }
    return Report(
        title=f"replay: {path.name}, {capacity:,} blocks",
        columns=[
            "policy",
            "hits",
            "hit ratio",
            "MIN bound",
            "of MIN",
            "stores refused",
            "evictions",
        ],
        rows=rows,
        summary=summary,
        notes=notes,
        formats={"hit ratio": RATIO, "MIN bound": RATIO, "of MIN": RATIO, "hits": COUNT},
    )
