"""``kvactors bench policy``: block operations per second of the manager's handshake.

Each request of the trace runs the full handshake through an
:class:`~kvactors.manager.OffloadingManager` (``lookup``, ``touch``,
``prepare_store``, ``complete_store``, exactly as ``kvactors replay`` does),
and counts ``len(blocks)`` block operations. The baseline is a bare
``OrderedDict`` LRU doing the same work on the same requests: count the
leading present keys, ``move_to_end`` the present keys in reverse, insert the
missing keys after ``popitem(last=False)`` evictions. Runs are interleaved
(baseline, then each policy, repeated) and the best of ``--repeat`` is kept;
the garbage collector is paused while a run is timed, as ``timeit`` does.

Goals: at least 0.5x the bare baseline, at least 500,000 block-ops/s, and,
for a policy that decides admission (``prefix_admit``), at most 2x the
``lru`` policy's time per block operation in the same run (``x lru cost``,
shown for every policy).

``--memory N`` measures something else instead: the RAM one manager of each
policy takes per block once ``N`` blocks (32-byte keys) are stored, and once
``N`` more have evicted them (ARC then remembers ``N`` ghost keys), each in a
fresh process, as the growth of its resident set; the keys themselves are
made before the first reading and are not counted (their size is printed).
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import queue
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import cast

from kvactors.cli.arguments import (
    DEFAULT_CAPACITY,
    add_capacity_arguments,
    block_count,
    capacity_blocks,
    positive_int,
    resolve_trace,
)
from kvactors.cli.replay_runs import BLOCK_TOKENS, handshake
from kvactors.cli.report import RATE, RATIO, Report, progress
from kvactors.errors import KVActorsError, TraceError
from kvactors.keys import Key
from kvactors.manager import NATIVE, OffloadingManager
from kvactors.policy import POLICIES
from kvactors.traces import load_trace

__all__ = [
    "MAX_LRU_COST",
    "MIN_OPS_PER_S",
    "MIN_RATIO",
    "MeasureFailed",
    "add_arguments",
    "bare_lru",
    "run",
]

MIN_RATIO = 0.5
"""Goal: a policy's block-ops/s over the bare ``OrderedDict`` LRU's, same run."""
MIN_OPS_PER_S = 500_000
"""Goal: block operations per second of the full handshake."""

MAX_LRU_COST = 2.0
"""Goal for an admission policy: its time per block operation over ``lru``'s, same run."""

BASELINE = "bare OrderedDict LRU"


def bare_lru(requests: Sequence[Sequence[Key]], capacity: int) -> int:
    """The baseline: the handshake on a bare ``OrderedDict``; returns the leading hits.

    Same semantics as the manager with the ``lru`` policy: a request with more
    blocks than ``capacity`` stores nothing, and evictions never hit the
    request's own keys (they were just moved to the most-recent end).
    """
    cache: OrderedDict[Key, None] = OrderedDict()
    move = cache.move_to_end
    evict = cache.popitem
    hits = 0
    for blocks in requests:
        for key in blocks:
            if key not in cache:
                break
            hits += 1
        for key in reversed(blocks):
            if key in cache:
                move(key)
        if len(blocks) > capacity:
            continue
        missing = [key for key in blocks if key not in cache]
        for _ in range(len(cache) + len(missing) - capacity):
            evict(last=False)
        for key in missing:
            cache[key] = None
    return hits


PYTHON = " (python core)"
"""Suffix of the rows that measure the Python manager beside the compiled one."""


def _manager_run(
    requests: Sequence[Sequence[Key]], policy: str, capacity: int, native: bool | None = None
) -> Callable[[], int]:
    def one_pass() -> int:
        manager = OffloadingManager(capacity, block_size=BLOCK_TOKENS, policy=policy, native=native)
        return handshake(manager, requests)[0]

    return one_pass


def _timed(fn: Callable[[], int]) -> tuple[float, int]:
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        hits = fn()
        return time.perf_counter() - start, hits
    finally:
        if enabled:
            gc.enable()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``kvactors bench policy``."""
    parser.add_argument(
        "--trace",
        metavar="PATH",
        help="a Mooncake JSONL trace or a bundled name (default: the bundled conversation trace)",
    )
    parser.add_argument(
        "--policy",
        choices=[*POLICIES, "all"],
        default="all",
        help="policy to measure (default: all)",
    )
    parser.add_argument(
        "--repeat",
        type=positive_int,
        default=5,
        metavar="N",
        help="runs of each subject; the best is kept (default: 5)",
    )
    parser.add_argument(
        "--memory",
        type=block_count,
        metavar="N",
        help="instead of timing: RAM per block of a manager holding N blocks (1..2**31-1)",
    )
    add_capacity_arguments(parser)


class MeasureFailed(KVActorsError):
    """A ``--memory`` process failed (a kvactors error) or died before reporting."""


KEY_BYTES = 32
"""The key size of ``--memory`` (a chained 32-byte hash, as the NVMe tier stores)."""


def _rss() -> int:
    """This process's resident set in bytes."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak, which only grows here
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _measure(policy: str, blocks: int, native: bool | None) -> tuple[list[float], float, bool]:
    """RSS growth per block after ``blocks`` stores, then after as many more; the seconds
    the stores took; whether the compiled core ran."""
    keys = [i.to_bytes(KEY_BYTES, "big") for i in range(2 * blocks)]
    gc.collect()
    gc.disable()
    before = _rss()
    manager = OffloadingManager(blocks, block_size=BLOCK_TOKENS, policy=policy, native=native)
    figures: list[float] = []
    start = time.perf_counter()
    for first in (0, blocks):
        for at in range(first, first + blocks, 64):
            stored = manager.prepare_store(keys[at : min(at + 64, first + blocks)])
            assert stored is not None
            manager.complete_store(stored.block_hashes_to_store)
        figures.append((_rss() - before) / blocks)
    return figures, time.perf_counter() - start, manager.native


def _fill(policy: str, blocks: int, native: bool | None, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """In a fresh process: :func:`_measure`, its answer put on ``out`` as ``("ok", ...)``,
    or ``("memory", message)`` when memory runs out, ``("error", message)`` for a
    kvactors error; Ctrl-C ends it quietly (the parent reports it)."""
    report: tuple[str, object]
    try:
        report = ("ok", _measure(policy, blocks, native))
    except MemoryError:
        # Put only once the except clause has dropped the traceback and its frames
        # (the keys, the manager): sending the answer needs a little memory too.
        report = ("memory", f"{blocks:,} blocks of {policy} do not fit in memory")
    except KVActorsError as exc:
        report = ("error", str(exc))
    except KeyboardInterrupt:
        return
    out.put(report)


def _child_answer(
    child: multiprocessing.process.BaseProcess,
    answers: multiprocessing.Queue,  # type: ignore[type-arg]
    policy: str,
) -> tuple[list[float], float, bool]:
    """Wait for ``child``'s answer on ``answers``; raise ``MemoryError`` when it ran out of
    memory, and :class:`MeasureFailed` for a kvactors error or a child that
    died without answering (killed, say, by the kernel's out-of-memory killer)."""
    while True:
        try:
            kind, value = answers.get(timeout=0.2)
            break
        except queue.Empty:
            if child.is_alive():
                continue
        try:  # it exited: what it sent before exiting may still be in the pipe
            kind, value = answers.get(timeout=1.0)
            break
        except queue.Empty:
            raise MeasureFailed(
                f"bench policy --memory: the {policy} process exited with status "
                f"{child.exitcode} before reporting (a negative status is the signal "
                "that ended it, such as 9 from the out-of-memory killer)"
            ) from None
    if kind == "memory":
        raise MemoryError(value)
    if kind == "error":
        raise MeasureFailed(f"bench policy --memory: {value}")
    return cast(tuple[list[float], float, bool], value)


def _memory(args: argparse.Namespace, names: list[str]) -> Report:
    blocks: int = args.memory
    context = multiprocessing.get_context("spawn")
    rows: list[list[object]] = []
    results: dict[str, object] = {}
    show: bool | None = False if args.json else None
    for name in progress(names, len(names), "bench policy --memory", enabled=show):
        answers = context.Queue()
        child = context.Process(target=_fill, args=(name, blocks, None, answers))
        child.start()
        try:
            figures, seconds, native = _child_answer(child, answers, name)
        finally:
            if child.is_alive():  # interrupted, or an answer that was an error
                child.terminate()
            child.join()
        rows.append([name, "compiled" if native else "python", figures[0], figures[1], seconds])
        results[name] = {
            "core": "compiled" if native else "python",
            "bytes_per_block_full": figures[0],
            "bytes_per_block_after_evicting_all": figures[1],
            "seconds": seconds,
        }
    key_size = sys.getsizeof(bytes(KEY_BYTES))
    return Report(
        title=f"bench policy --memory: {blocks:,} blocks, {KEY_BYTES}-byte keys",
        columns=["policy", "core", "B/block full", "B/block after N more", "s"],
        rows=rows,
        summary={
            "command": "bench policy --memory",
            "blocks": blocks,
            "key_bytes": KEY_BYTES,
            "key_object_bytes": key_size,
            "policies": results,
        },
        notes=[
            "RAM growth of a fresh process per block stored (resident set), the keys "
            f"made beforehand and not counted: each {KEY_BYTES}-byte key is a "
            f"{key_size}-byte bytes object the caller owns and the manager references.",
            "'after N more': N further stores evicted the first N (arc keeps them as ghosts).",
        ],
        formats={"B/block full": ".1f", "B/block after N more": ".1f", "s": ".1f"},
    )


def run(args: argparse.Namespace) -> Report:
    """Run ``kvactors bench policy``; raises the trace's or the capacity's typed error."""
    if getattr(args, "memory", None):
        return _memory(args, list(POLICIES) if args.policy == "all" else [args.policy])
    path = resolve_trace(args.trace)
    requests = [request.hash_ids for request in load_trace(path)]
    unique = len({key for blocks in requests for key in blocks})
    capacity = capacity_blocks(unique, blocks=args.blocks, fraction=args.capacity)
    ops = sum(len(blocks) for blocks in requests)
    if not ops:
        raise TraceError(f"{path}: no block accesses to time (every request's hash_ids is empty)")
    names = list(POLICIES) if args.policy == "all" else [args.policy]

    subjects: list[tuple[str, Callable[[], int]]] = [
        (BASELINE, lambda: bare_lru(requests, capacity))
    ]
    # lru is the yardstick of the cost goal: measured whichever policies are asked for.
    timed = names if "lru" in names else ["lru", *names]
    subjects += [(name, _manager_run(requests, name, capacity)) for name in timed]
    # With the compiled core built, the Python manager is measured too, for reference.
    compiled = set(timed) if NATIVE else set()
    # The Python manager beside the compiled one, for the policies that have both.
    references = [name + PYTHON for name in names if name in compiled]
    subjects += [
        (ref, _manager_run(requests, ref.removesuffix(PYTHON), capacity, native=False))
        for ref in references
    ]
    best: dict[str, float] = {}
    hits: dict[str, int] = {}
    runs = [(rep, subject) for rep in range(args.repeat) for subject in subjects]
    show: bool | None = False if args.json else None
    for _, (label, fn) in progress(runs, len(runs), "bench policy", enabled=show):
        seconds, hits[label] = _timed(fn)
        best[label] = min(seconds, best.get(label, seconds))

    base_rate = ops / best[BASELINE]
    rows: list[list[object]] = [
        [
            BASELINE,
            hits[BASELINE] / ops if ops else 0.0,
            best[BASELINE],
            base_rate,
            1.0,
            best[BASELINE] / best["lru"],
            None,
            None,
            None,
        ]
    ]
    results: dict[str, object] = {}
    all_met = True
    for name in timed:
        rate = ops / best[name]
        ratio = rate / base_rate
        ratio_met = ratio >= MIN_RATIO
        rate_met = rate >= MIN_OPS_PER_S
        lru_cost = best[name] / best["lru"]
        # The cost goal is an admission policy's (the extra work of admit).
        cost_met = lru_cost <= MAX_LRU_COST if hasattr(POLICIES[name], "admit") else None
        all_met = all_met and ratio_met and rate_met and cost_met is not False
        hit_ratio = hits[name] / ops if ops else 0.0
        rows.append(
            [name, hit_ratio, best[name], rate, ratio, lru_cost, ratio_met, rate_met, cost_met]
        )
        results[name] = {
            "seconds": best[name],
            "block_ops_per_s": rate,
            "ratio_vs_baseline": ratio,
            "cost_vs_lru": lru_cost,
            "hits": hits[name],
            "ratio_goal_met": ratio_met,
            "rate_goal_met": rate_met,
            "cost_goal_met": cost_met,
            "core": "compiled" if name in compiled else "python",
        }
    for ref in references:
        rate = ops / best[ref]
        cost = best[ref] / best["lru"]
        rows.append(
            [ref, hits[ref] / ops if ops else 0.0, best[ref], rate, rate / base_rate, cost]
            + [None] * 3
        )
        results[ref] = {
            "seconds": best[ref],
            "block_ops_per_s": rate,
            "ratio_vs_baseline": rate / base_rate,
            "cost_vs_lru": cost,
            "hits": hits[ref],
            "core": "python",
        }
    notes = [
        f"trace: {path} ({len(requests):,} requests, {ops:,} block-ops per run)",
        f"capacity: {capacity:,} blocks"
        + (
            ""
            if args.blocks is not None
            else f" ({float(args.capacity or DEFAULT_CAPACITY):g} of {unique:,} unique)"
        ),
        f"best of {args.repeat} interleaved runs; one block-op is one key of one request "
        "through lookup + touch + prepare_store + complete_store.",
        "policies run on the compiled core (kvactors._manager_core); rows marked "
        f"'{PYTHON.strip()}' are the Python manager, for reference (no goal)"
        if NATIVE
        else "policies run on the Python manager: the compiled core is not built",
        f"goals: >= {MIN_RATIO}x the bare LRU, >= {MIN_OPS_PER_S:,} block-ops/s and "
        f"<= {MAX_LRU_COST:g}x lru's time per block-op ('x lru cost') for admission "
        "policies: " + ("all met" if all_met else "NOT all met"),
    ]
    if "lru" in hits and hits["lru"] != hits[BASELINE]:
        notes.append(
            f"warning: lru found {hits['lru']:,} hits but the bare LRU {hits[BASELINE]:,}; "
            "the two should agree."
        )
    return Report(
        title=f"bench policy: {path.name}, {capacity:,} blocks",
        columns=[
            "handshake",
            "hit ratio",
            "best s",
            "block-ops/s",
            "x bare LRU",
            "x lru cost",
            f">= {MIN_RATIO}x",
            f">= {MIN_OPS_PER_S // 1000}k/s",
            f"<= {MAX_LRU_COST:g}x lru",
        ],
        rows=rows,
        summary={
            "command": "bench policy",
            "trace": str(path),
            "requests": len(requests),
            "block_ops_per_run": ops,
            "capacity_blocks": capacity,
            "repeat": args.repeat,
            "goals": {
                "min_ratio": MIN_RATIO,
                "min_block_ops_per_s": MIN_OPS_PER_S,
                "max_cost_vs_lru": MAX_LRU_COST,
            },
            "baseline": {
                "name": BASELINE,
                "seconds": best[BASELINE],
                "block_ops_per_s": base_rate,
                "hits": hits[BASELINE],
            },
            "policies": results,
            "all_goals_met": all_met,
        },
        notes=notes,
        formats={
            "hit ratio": RATIO,
            "best s": RATIO,
            "block-ops/s": RATE,
            "x bare LRU": ".2f",
            "x lru cost": ".2f",
        },
    )
