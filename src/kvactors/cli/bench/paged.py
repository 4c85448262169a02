"""``kvactors bench paged``: block allocator operations per second and the swap round trip.

Allocator: every request of a synthetic workload (prompts in families sharing
a prefix) is allocated, extended one token at a time (decode) and freed, on a
:class:`~kvactors.paged.BlockAllocator` (chained hashes, prefix sharing, LRU
cache). One operation is one ``allocate``, ``extend`` or ``free``. The baseline
is a bare free list doing the same allocations with no hashing and no sharing.

Round trip: a request of ``--swap-blocks`` blocks is swapped out of a
:class:`~kvactors.paged.PagedKVCache` and back in (its blocks evicted in
between, so every block is really stored and loaded), through the
coordinator's CPU tier (``--offloader coordinator``) or a bare in-memory row
store (``memory``). Its GB/s count the bytes out plus the bytes back in; the
baseline is the same bytes copied out to host memory (pinned under CUDA) and
back, each way in one contiguous ``copy_``, counted the same way.

Runs are interleaved (baseline, subject, repeated) and the best of
``--repeat`` is kept; the garbage collector is paused while a run is timed.

Goals: the allocator at least 0.03x the bare free list and 100,000 ops/s; the
round trip at least 0.1x the contiguous copy.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvactors.cli.arguments import positive_int
from kvactors.cli.bench.baseline import HostRoundTrip, sync
from kvactors.cli.report import GBPS, RATE, RATIO, Report, progress
from kvactors.cli.stopping import run_async
from kvactors.keys import Key
from kvactors.paged import BlockAllocator, KVCacheConfig, Offloader, PagedKVCache

__all__ = ["MIN_COPY_RATIO", "MIN_OPS_PER_S", "MIN_OPS_RATIO", "add_arguments", "run"]

MIN_OPS_RATIO = 0.03
"""Goal: allocator ops/s over the bare free list's, same run."""
MIN_OPS_PER_S = 100_000
"""Goal: allocator operations (allocate, extend, free) per second."""
MIN_COPY_RATIO = 0.1
"""Goal: swap_out + swap_in GB/s over one contiguous copy's, same run."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``kvactors bench paged``."""
    options: list[tuple[str, int | str, str]] = [
        ("--requests", 2000, "requests in the allocator workload"),
        ("--prompt", 256, "prompt length in tokens"),
        ("--decode", 64, "tokens each request is extended by, one at a time"),
        ("--block-size", 16, "tokens per block"),
        ("--layers", 4, "round trip KV layout: layers"),
        ("--kv-heads", 8, "round trip KV layout: KV heads"),
        ("--head-dim", 128, "round trip KV layout: head size (fp16)"),
        ("--swap-blocks", 64, "blocks swapped out and back in"),
        ("--repeat", 5, "runs of each subject; the best is kept"),
    ]
    for flag, default, text in options:
        parser.add_argument(
            flag,
            type=positive_int,
            default=default,
            metavar="N",
            help=f"{text} (default: {default})",
        )
    parser.add_argument(
        "--device", default="cpu", help="KV tensors' device: cpu, cuda, cuda:N, auto (default: cpu)"
    )
    parser.add_argument(
        "--offloader",
        choices=["coordinator", "memory"],
        default="coordinator",
        help="where swapped blocks go: the coordinator's CPU tier or a bare row store "
        "(default: coordinator)",
    )


def _timed(fn: Callable[[], object]) -> float:
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()


# -- allocator operations -----------------------------------------------------------


def _workload(args: argparse.Namespace) -> list[list[int]]:
    rng = random.Random(0)
    prefixes = [[rng.randrange(32000) for _ in range(args.prompt // 2)] for _ in range(8)]
    return [
        rng.choice(prefixes) + [rng.randrange(32000) for _ in range(args.prompt - args.prompt // 2)]
        for _ in range(args.requests)
    ]


def _pool_blocks(args: argparse.Namespace) -> int:
    per_request: int = -(-(args.prompt + args.decode) // args.block_size)
    return 16 * per_request  # room for a handful of requests and a prefix cache


def _allocator_run(args: argparse.Namespace, prompts: list[list[int]]) -> Callable[[], int]:
    def go() -> int:
        a = BlockAllocator(_pool_blocks(args), args.block_size, root=b"bench")
        ops = 0
        live: list[int] = []
        for rid, prompt in enumerate(prompts):
            a.allocate(rid, prompt)
            live.append(rid)
            ops += 1
            for t in range(args.decode):
                a.extend(rid, [t])
            ops += args.decode
            if len(live) == 4:  # a few requests in flight at once
                a.free(live.pop(0))
                ops += 1
        for rid in live:
            a.free(rid)
            ops += 1
        return ops

    return go


def _free_list_run(args: argparse.Namespace, prompts: list[list[int]]) -> Callable[[], int]:
    """The baseline: the same allocations from a bare free list."""
    bs = args.block_size

    def go() -> int:
        free = list(range(_pool_blocks(args)))
        tables: dict[int, list[int]] = {}
        lengths: dict[int, int] = {}
        ops = 0
        live: list[int] = []

        def release(rid: int) -> None:
            free.extend(tables.pop(rid))
            del lengths[rid]

        for rid, prompt in enumerate(prompts):
            tables[rid] = [free.pop() for _ in range(-(-len(prompt) // bs))]
            lengths[rid] = len(prompt)
            live.append(rid)
            ops += 1
            for _ in range(args.decode):
                if lengths[rid] % bs == 0:
                    tables[rid].append(free.pop())
                lengths[rid] += 1
            ops += args.decode
            if len(live) == 4:
                release(live.pop(0))
                ops += 1
        for rid in live:
            release(rid)
            ops += 1
        return ops

    return go


# -- the round trip -----------------------------------------------------------------


class _RowStore:
    """A bare in-memory offloader: one preallocated tensor of rows, a dict of slots."""

    def __init__(self, rows: int, row_bytes: int) -> None:
        self.pool = torch.empty((rows, row_bytes), dtype=torch.uint8).fill_(0)  # pages faulted in
        self.slots: dict[Key, int] = {}
        self.owner: dict[int, Key] = {}
        self.next = 0

    @staticmethod
    def _words(rows: torch.Tensor) -> torch.Tensor:
        # Whole words: torch's byte-wise row gathers are many times slower.
        ok = rows.shape[-1] % 8 == 0 and rows.data_ptr() % 8 == 0
        return rows.view(torch.int64) if ok else rows

    async def lookup(self, keys: Sequence[Key]) -> int:
        hits = 0
        while hits < len(keys) and keys[hits] in self.slots:
            hits += 1
        return hits

    async def store(self, keys: Sequence[Key], src: torch.Tensor) -> int:
        slots = []
        for key in keys:  # a ring: the oldest row makes room
            slot = self.next % len(self.pool)
            self.next += 1
            old = self.owner.pop(slot, None)
            if old is not None:
                del self.slots[old]
            self.slots[key], self.owner[slot] = slot, key
            slots.append(slot)
        rows = src.view(torch.uint8).view(len(keys), -1).to(self.pool.device)
        pool, new = self._words(self.pool), self._words(rows)
        if new.dtype != pool.dtype:
            pool, new = self.pool, rows
        pool[torch.tensor(slots)] = new
        return len(keys)

    async def load(self, keys: Sequence[Key], dst: torch.Tensor) -> None:
        idx = torch.tensor([self.slots[k] for k in keys])
        rows = dst.view(torch.uint8).view(len(keys), -1)
        pool, out = self._words(self.pool), self._words(rows)
        if out.device == pool.device and out.dtype == pool.dtype:
            torch.index_select(pool, 0, idx, out=out)  # straight into dst: no fresh pages
        else:
            rows.copy_(pool.index_select(0, idx).view(torch.uint8))


def _kv_config(args: argparse.Namespace) -> KVCacheConfig:
    return KVCacheConfig(
        num_layers=args.layers,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        dtype="float16",
        block_size=args.block_size,
        num_gpu_blocks=2 * args.swap_blocks + 1,
        device=args.device,
        watermark=0.0,
    )


async def _round_trips(
    args: argparse.Namespace, offloader: Offloader, repeat: int, show: bool | None
) -> tuple[list[float], list[float]]:
    """Times of ``repeat`` swap round trips and as many contiguous copies, interleaved,
    after one warm-up of each."""
    config = _kv_config(args)
    cache = PagedKVCache(config, offloader)
    for layer in cache.kv.layers:
        layer.copy_(torch.randn(layer.shape, dtype=torch.float32).to(layer.dtype))
    device = cache.kv.device
    # Out to host memory and back, contiguous: the best a round trip through the
    # offload tiers could do.
    baseline = HostRoundTrip(args.swap_blocks * config.block_size_bytes, device)
    trips: list[float] = []
    copies: list[float] = []
    tokens = args.swap_blocks * args.block_size
    filler = list(range(10**6, 10**6 + config.num_gpu_blocks * args.block_size))
    # One more than asked: the first is a warm-up (first touches of every buffer), dropped.
    for rep in progress(range(repeat + 1), repeat + 1, "bench paged: round trip", enabled=show):
        copies.append(baseline())
        rid = f"r{rep}"
        prompt = [rep * 7919 + t for t in range(tokens)]  # new keys: nothing is stored yet
        await cache.allocate(rid, prompt)
        sync(device)
        start = time.perf_counter()
        out = await cache.swap_out(rid)
        sync(device)
        elapsed = time.perf_counter() - start
        # Evict the request's blocks without timing it, so swap_in loads them all.
        await cache.allocate("filler", filler)
        cache.allocator.free("filler", computed=False)
        sync(device)
        start = time.perf_counter()
        back = await cache.swap_in(out)
        sync(device)
        trips.append(elapsed + time.perf_counter() - start)
        if back.num_loaded_tokens != tokens or out.stored_blocks != args.swap_blocks:
            raise RuntimeError(  # pragma: no cover - a broken cache, not a slow one
                f"round trip moved {out.stored_blocks} blocks out and "
                f"{back.num_loaded_tokens} tokens back, expected {args.swap_blocks} / {tokens}"
            )
        cache.allocator.free(rid, computed=False)
    return trips[1:], copies[1:]


async def _measure_round_trips(
    args: argparse.Namespace, show: bool | None
) -> tuple[list[float], list[float]]:
    config = _kv_config(args)
    if args.offloader == "memory":
        return await _round_trips(
            args, _RowStore(4 * args.swap_blocks, config.offload_bytes), args.repeat, show
        )
    from kvactors.cache.handle import open as open_cache
    from kvactors.config import Config, GPUConfig, TierConfig

    tiers = Config(
        block_bytes=config.offload_bytes,
        gpu=GPUConfig(num_blocks=1, device="cpu"),
        cpu=TierConfig(num_blocks=2 * args.swap_blocks),
        nvme=None,
    )
    async with open_cache(tiers) as kv:
        return await _round_trips(args, kv, args.repeat, show)


def run(args: argparse.Namespace) -> Report:
    """Run ``kvactors bench paged``; raises ConfigError for a bad layout or device."""
    show: bool | None = False if args.json else None
    _kv_config(args).resolved_device()  # a bad layout or device fails before any run
    prompts = _workload(args)
    subjects = [("bare free list", _free_list_run(args, prompts)),
                ("BlockAllocator", _allocator_run(args, prompts))]  # fmt: skip
    ops = subjects[0][1]()
    best: dict[str, float] = {}
    runs = [subject for _ in range(args.repeat) for subject in subjects]
    for name, fn in progress(runs, len(runs), "bench paged: allocator", enabled=show):
        seconds = _timed(fn)
        best[name] = min(seconds, best.get(name, seconds))
    base_ops = ops / best["bare free list"]
    ours_ops = ops / best["BlockAllocator"]

    trips, copies = run_async(_measure_round_trips, args, show)
    config = _kv_config(args)
    nbytes = args.swap_blocks * config.block_size_bytes
    copy_gbps = 2 * nbytes / min(copies) / 1e9
    trip_gbps = 2 * nbytes / min(trips) / 1e9

    ops_met = ours_ops / base_ops >= MIN_OPS_RATIO and ours_ops >= MIN_OPS_PER_S
    trip_met = trip_gbps / copy_gbps >= MIN_COPY_RATIO
    rows: list[list[object]] = [
        ["bare free list", base_ops, None, best["bare free list"], 1.0, None],
        ["BlockAllocator", ours_ops, None, best["BlockAllocator"], ours_ops / base_ops, ops_met],
        ["contiguous out and back", None, copy_gbps, min(copies), 1.0, None],
        ["swap_out + swap_in", None, trip_gbps, min(trips), trip_gbps / copy_gbps, trip_met],
    ]
    summary: dict[str, Any] = {
        "command": "bench paged",
        "ops_per_run": ops,
        "repeat": args.repeat,
        "allocator": {
            "ops_per_s": ours_ops,
            "baseline_ops_per_s": base_ops,
            "ratio_vs_baseline": ours_ops / base_ops,
            "goals_met": ops_met,
        },
        "round_trip": {
            "offloader": args.offloader,
            "device": str(config.resolved_device()),
            "blocks": args.swap_blocks,
            "block_bytes": config.block_size_bytes,
            "gbps": trip_gbps,
            "baseline_gbps": copy_gbps,
            "ratio_vs_baseline": trip_gbps / copy_gbps,
            "goals_met": trip_met,
        },
        "goals": {
            "min_ops_ratio": MIN_OPS_RATIO,
            "min_ops_per_s": MIN_OPS_PER_S,
            "min_copy_ratio": MIN_COPY_RATIO,
        },
        "all_goals_met": ops_met and trip_met,
    }
    notes = [
        f"allocator: {args.requests:,} requests of {args.prompt} tokens (8 shared prefixes of "
        f"{args.prompt // 2}), each extended {args.decode} times, 4 in flight; "
        f"{ops:,} ops per run",
        f"round trip: {args.swap_blocks} blocks of {config.block_size_bytes:,} bytes "
        f"({nbytes / 2**20:.1f} MiB) out and back through the {args.offloader} offloader, "
        f"KV on {config.resolved_device()}; GB/s count bytes out plus bytes in, for the "
        "round trip and for the contiguous copies out to host memory and back",
        f"best of {args.repeat} interleaved runs. goals: allocator >= {MIN_OPS_RATIO}x the "
        f"free list and >= {MIN_OPS_PER_S:,} ops/s; round trip >= {MIN_COPY_RATIO}x the copy: "
        + ("all met" if ops_met and trip_met else "NOT all met"),
    ]
    return Report(
        title="bench paged: allocator ops and swap round trip",
        columns=["subject", "ops/s", "GB/s", "best s", "x baseline", "goal met"],
        rows=rows,
        summary=summary,
        notes=notes,
        formats={"ops/s": RATE, "GB/s": GBPS, "best s": ".4f", "x baseline": RATIO},
    )
