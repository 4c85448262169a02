"""``kvactors replay``: the hit ratio of each eviction policy on a trace, beside Belady's MIN.

The command's arguments and report; the replays themselves (through one
manager, through the served cache, and Belady's MIN) are in
:mod:`kvactors.cli.replay_runs`, whose names this module re-exports.
"""

from __future__ import annotations

import argparse
import time

from kvactors.cli.arguments import (
    DEFAULT_CAPACITY,
    add_capacity_arguments,
    capacity_blocks,
    resolve_trace,
)
from kvactors.cli.replay_runs import (
    BLOCK_TOKENS,
    ReplayResult,
    belady,
    gap_share,
    handshake,
    replay,
    replay_served,
)
from kvactors.cli.report import COUNT, RATIO, Report
from kvactors.errors import ConfigError
from kvactors.policy import POLICIES
from kvactors.traces import BUNDLED_TRACES, load_trace

__all__ = [
    "BLOCK_TOKENS",
    "DEFAULT_CAPACITY",
    "ReplayResult",
    "add_arguments",
    "belady",
    "capacity_blocks",
    "gap_share",
    "handshake",
    "replay",
    "replay_served",
    "resolve_trace",
    "run",
]


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
    parser.add_argument(
        "--served",
        action="store_true",
        help="replay through the served cache (kvactors.open: real actors) instead of "
        "one bare manager",
    )
    parser.add_argument(
        "--bytes",
        action="store_true",
        help="with --served: copy every block's bytes (64 B blocks) instead of "
        "moving metadata only",
    )


def run(args: argparse.Namespace) -> Report:
    """Run ``kvactors replay``; raises the trace's or the capacity's typed error."""
    served: bool = args.served
    if args.bytes and not served:  # before the trace is read: it may be large, or missing
        raise ConfigError("--bytes needs --served (a bare manager moves no bytes)")
    path = resolve_trace(args.trace)
    trace = load_trace(path)
    requests = [request.hash_ids for request in trace]
    unique = len({key for blocks in requests for key in blocks})
    capacity = capacity_blocks(unique, blocks=args.blocks, fraction=args.capacity)
    show: bool | None = False if args.json else None
    names = list(POLICIES) if args.policy == "all" else [args.policy]
    mode = ("served, bytes" if args.bytes else "served, no bytes") if served else "manager"

    def one(name: str) -> ReplayResult:
        if served:
            return replay_served(
                requests, name, capacity, move_bytes=args.bytes, show_progress=show
            )
        return replay(requests, name, capacity, show_progress=show)

    bound = belady(requests, capacity, show_progress=show)
    results: dict[str, tuple[ReplayResult, float]] = {}
    for name in names:
        start = time.perf_counter()
        result = one(name)
        results[name] = (result, time.perf_counter() - start)
    # The gap is measured from LRU replayed the same way.
    lru = results["lru"][0] if "lru" in results else one("lru")

    def of_bound(result: ReplayResult) -> float | None:
        return result.hits / bound.hits if bound.hits else None

    def of_gap(result: ReplayResult) -> float | None:
        return gap_share(result.hits, lru.hits, bound.hits)

    rows: list[list[object]] = [
        [
            name,
            result.hits,
            result.hit_ratio,
            bound.hit_ratio,
            of_bound(result),
            of_gap(result),
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
        "'of gap' is the share of the LRU -> MIN gap a policy closes (0 = LRU, 1 = MIN).",
        "hits count the leading blocks of a request found ready (prefix hits), "
        "for the policies and MIN alike.",
        "replayed through the served cache (kvactors.open: coordinator, policy actor, "
        "CPU tier actor), "
        + ("copying every block's bytes" if args.bytes else "metadata only (move_bytes=False)")
        if served
        else "replayed through one OffloadingManager (lookup, touch, prepare_store, "
        "complete_store)",
    ]
    if bound.hits != bound.resident_hits:
        notes.append(
            f"this trace is not prefix-closed: MIN finds {bound.resident_hits:,} blocks "
            "resident but only the leading ones count; the bound may not hold."
        )
    if bound.stores_refused:
        notes.append(
            f"{bound.stores_refused:,} "
            + ("request has" if bound.stores_refused == 1 else "requests have")
            + " more blocks than the capacity and stored nothing (stores refused); "
            "MIN is then not guaranteed to be a bound."
        )
    above = [
        (name, result.hits) for name, (result, _) in results.items() if result.hits > bound.hits
    ]
    if above:
        who = ", ".join(f"{name} ({hits:,} hits)" for name, hits in above)
        notes.append(
            f"above MIN's {bound.hits:,} hits: {who}. MIN bounds only policies that store "
            "every missing block of a request that fits (not prefix_admit, which may "
            "decline some), on a prefix-closed trace with no store refused."
        )
    summary: dict[str, object] = {
        "command": "replay",
        "trace": str(path),
        "requests": len(requests),
        "block_accesses": accesses,
        "unique_blocks": unique,
        "capacity_blocks": capacity,
        "capacity_fraction": fraction,
        "mode": mode,
        "lru_hits": lru.hits,
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
                "of_gap": of_gap(result),
                "stores_refused": result.stores_refused,
                "evictions": result.evictions,
                "seconds": seconds,
            }
            for name, (result, seconds) in results.items()
        },
    }
    return Report(
        title=f"replay: {path.name}, {capacity:,} blocks" + (" (served cache)" if served else ""),
        columns=[
            "policy",
            "hits",
            "hit ratio",
            "MIN bound",
            "of MIN",
            "of gap",
            "stores refused",
            "evictions",
        ],
        rows=rows,
        summary=summary,
        notes=notes,
        formats={
            "hit ratio": RATIO,
            "MIN bound": RATIO,
            "of MIN": RATIO,
            "of gap": RATIO,
            "hits": COUNT,
        },
    )
