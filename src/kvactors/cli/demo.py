"""``kvactors demo``: replay a trace through the whole stack with real bytes.

Every request of the trace, in file order, with up to ``concurrency`` requests
in flight: ``lookup`` its blocks; ``load`` the leading hits into its GPU-pool
slots and check each loaded block against the bytes derived from its key (a
mismatch fails the run); then write the missing blocks' bytes into the GPU
pool and ``store`` them. The next request's blocks are hinted with ``prefetch``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import torch

import kvactors
from kvactors.cli.arguments import block_count, positive_int
from kvactors.cli.report import Report
from kvactors.cli.stopping import run_async
from kvactors.config import Config, GPUConfig, NVMeConfig, RemoteConfig, TierConfig
from kvactors.errors import KVActorsError
from kvactors.traces import BUNDLED_TRACES, bundled_trace

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["DemoResult", "block_bytes_for", "run_demo"]


class IntegrityFailure(KVActorsError):
    """A block loaded back differs from the bytes stored under its key."""


# direction -> (tier actor, job kind) whose counters measure it

_MUL = 0x9E3779B97F4A7C15 & 0x7FFFFFFFFFFFFFFF
_MASK = (1 << 64) - 1
_HALF = 1 << 63


def block_bytes_for(keys: list[int], block_bytes: int, device: torch.device) -> torch.Tensor:
    """The bytes of ``keys``' blocks: ``(n, block_bytes)`` uint8.

    Distinct for ids distinct modulo 2**64 (the pattern uses an id's low 64 bits).
    """
    words = block_bytes // 8
    # Trace ids are any integers; the pattern is made from their low 64 bits (two's complement).
    folded = [((key + _HALF) & _MASK) - _HALF for key in keys]
    k = torch.tensor(folded, dtype=torch.int64, device=device).unsqueeze(1)
    pos = torch.arange(words, dtype=torch.int64, device=device).unsqueeze(0)
    # k -> k * _MUL is a bijection of 64-bit words (_MUL is odd): distinct ids, distinct words.
    rows = (k * _MUL) ^ (pos * 0x100000001B3)
    return rows.view(torch.uint8).view(len(keys), block_bytes)


class DemoResult(dict[str, Any]):
    """The demo's figures, ready for the report."""


async def run_demo(
    requests: list[list[int]],
    config: Config,
    *,
    concurrency: int = 4,
    progress: Any = None,
) -> DemoResult:
    """Replay ``requests`` (lists of int keys) through a cache built from ``config``.

    Raises :class:`IntegrityFailure` on the first block that loads back wrong.
    """
    max_len = max((len(r) for r in requests), default=1)
    if config.gpu.num_blocks < concurrency * max_len:
        raise kvactors.errors.ConfigError(
            f"gpu.num_blocks: {config.gpu.num_blocks} < concurrency x longest request "
            f"({concurrency} x {max_len})"
        )
    bb = config.block_bytes
    counts = {"requests": 0, "blocks": 0, "hits": 0, "hits_cpu": 0, "hits_nvme": 0}
    counts["hits_remote"] = 0
    counts |= {"stored": 0, "store_refused": 0, "verified": 0, "prefetch_sent": 0}
    start = time.perf_counter()
    async with kvactors.open(config) as kv:
        pool: Any = kv.gpu_pool
        device = pool.device
        free_ranges = list(range(concurrency))
        send, recv = anyio.create_memory_object_stream[int](concurrency)
        for r in free_ranges:
            send.send_nowait(r)

        async def serve(i: int, blocks: list[int], slot_range: int) -> None:
            try:
                base = slot_range * max_len
                slots = list(range(base, base + len(blocks)))
                # The scheduler's question first; then lookup and load in one
                # step, since the first answer may be outdated by the time the
                # load runs (other requests evict).
                await kv.lookup(blocks)
                found = await kv.load(blocks, slots, partial=True)
                hits = len(found.tiers)
                if hits:
                    got = pool.rows(slots[:hits])
                    want = block_bytes_for(blocks[:hits], bb, device)
                    if not torch.equal(got, want):
                        bad = next(j for j in range(hits) if not torch.equal(got[j], want[j]))
                        raise IntegrityFailure(
                            f"request {i}: block {blocks[bad]} loaded back wrong"
                        )
                    counts["verified"] += hits
                    counts["hits_cpu"] += found.tiers.count("cpu")
                    counts["hits_nvme"] += found.tiers.count("nvme")
                    counts["hits_remote"] += found.tiers.count("remote")
                counts["hits"] += hits
                counts["blocks"] += len(blocks)
                missing = blocks[hits:]
                if missing:
                    pool.write_rows(slots[hits:], block_bytes_for(missing, bb, device))
                    res = await kv.store(missing, slots[hits:])
                    if res is None:
                        counts["store_refused"] += len(missing)
                    else:
                        counts["stored"] += res.stored
                counts["requests"] += 1
                if progress is not None:
                    progress(1)
            finally:
                send.send_nowait(slot_range)

        try:
            async with anyio.create_task_group() as tg:
                for i, blocks in enumerate(requests):
                    slot_range = await recv.receive()
                    if i + 1 < len(requests) and kv.prefetch(requests[i + 1]):
                        counts["prefetch_sent"] += 1
                    tg.start_soon(serve, i, blocks, slot_range)
        except BaseExceptionGroup as group:
            # A request's error (IntegrityFailure, a typed cache error) leaves as
            # itself, so the command reports it in one line.
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
                raise group.exceptions[0] from None
            raise
        finally:
            send.close()
            recv.close()
        stats = await kv.stats()
    elapsed = time.perf_counter() - start
    result = DemoResult(counts)
    result["seconds"] = elapsed
    result["prefix_hit_ratio"] = counts["hits"] / max(1, counts["blocks"])
    moved: dict[str, dict[str, float]] = {}
    # Every transfer is counted by the tier actor that ran it, keyed source->destination.
    for t in stats.tiers.values():
        for direction, o in t.transfers.items():
            moved[direction] = {
                "bytes": o.bytes,
                "jobs": o.jobs,
                "seconds": o.seconds,
                "gb_per_s": o.bytes / o.seconds / 1e9 if o.seconds else 0.0,
            }
    result["moved"] = moved
    result["latency_us"] = {
        k: {"count": v.count, "p50": v.p50_us, "p99": v.p99_us} for k, v in stats.latency.items()
    }
    result["promoted"] = stats.policy.promoted
    result["demoted"] = stats.policy.demoted
    result["prefetch_dropped"] = stats.prefetch_dropped
    result["failed_stores"] = stats.failed_stores
    result["failed_loads"] = stats.failed_loads
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trace",
        default=None,
        help="Mooncake JSONL trace, or a bundled name (conversation, synthetic); "
        "default: conversation",
    )
    parser.add_argument(
        "--requests", type=positive_int, default=None, help="replay only the first N"
    )
    parser.add_argument(
        "--block-kib", type=positive_int, default=16, help="bytes per block, in KiB"
    )
    parser.add_argument("--cpu-blocks", type=block_count, default=4096, help="CPU tier slots")
    parser.add_argument("--nvme-blocks", type=block_count, default=32768, help="NVMe tier slots")
    parser.add_argument("--nvme-dir", default=None, help="NVMe directory (default: temporary)")
    parser.add_argument("--no-nvme", action="store_true", help="run with GPU and CPU tiers only")
    parser.add_argument("--concurrency", type=positive_int, default=4, help="requests in flight")
    parser.add_argument("--policy", default="lru", help="CPU tier policy")
    parser.add_argument(
        "--write-mode", choices=["write_back", "write_through"], default="write_back"
    )
    parser.add_argument("--device", default="auto", help="GPU pool device: auto, cpu, cuda")
    parser.add_argument(
        "--remote",
        metavar="URL",
        default=None,
        help="add a remote tier on this Valkey / Redis server (redis://host:port/db)",
    )


def run(args: argparse.Namespace) -> Report:
    from kvactors.cli.arguments import resolve_trace
    from kvactors.cli.report import ProgressBar
    from kvactors.traces import load_trace

    path = resolve_trace(args.trace)
    requests = [r.hash_ids for r in load_trace(path)]
    if args.requests is not None:
        requests = requests[: args.requests]
    requests = [r for r in requests if r]
    longest = max((len(r) for r in requests), default=1)
    config = default_config(args).replace(
        gpu={"num_blocks": args.concurrency * longest, "device": args.device}
    )
    if args.remote is not None:
        # As bench remote --url: a server that does not answer (or refuses the
        # login) is one error line before anything runs, not a demo whose remote
        # tier is down from its first call.
        from kvactors.cli.bench.remote import check_answers

        check_answers(args.remote, "demo")
    bar = ProgressBar(len(requests), "demo", enabled=None if not args.json else False)
    result = run_async(
        lambda: run_demo(requests, config, concurrency=args.concurrency, progress=bar.advance)
    )
    bar.close()
    rows: list[list[object]] = []
    for direction, m in result["moved"].items():
        rows.append([direction, m["bytes"] / 2**20, m["jobs"], m["gb_per_s"]])
    lat = result["latency_us"]
    summary = dict(result)
    summary["trace"] = str(path)
    summary["config"] = msgspec.to_builtins(config)
    if config.remote is not None:  # the JSON summary never shows a password
        summary["config"]["remote"] = msgspec.to_builtins(config.remote.masked())
    notes = [
        f"{result['requests']:,} requests, {result['blocks']:,} blocks in "
        f"{result['seconds']:.1f} s; every loaded block checked against its key: "
        f"{result['verified']:,} verified, 0 wrong",
        f"prefix hit ratio {result['prefix_hit_ratio']:.3f}: "
        f"{result['hits_cpu']:,} hits in CPU, {result['hits_nvme']:,} in NVMe"
        + (f", {result['hits_remote']:,} in remote" if config.remote is not None else "")
        + "; "
        f"{result['promoted']:,} promoted, {result['demoted']:,} demoted",
        "latency p50 / p99 (us): "
        + (
            ", ".join(
                f"{op} {v['p50']:,.0f} / {v['p99']:,.0f}" for op, v in lat.items() if v["count"]
            )
            or "no calls made"
        ),
    ]
    names = {"cpu": "CPU", "nvme": "NVMe"}
    tiers = ", ".join(["GPU pool", *(names.get(name, name) for name, _ in config.chain())])
    return Report(
        title=f"kvactors demo: {_trace_name(path)} through {tiers}",
        columns=["direction", "MiB", "jobs", "GB/s"],
        rows=rows,
        summary=summary,
        formats={"MiB": ",.1f", "GB/s": ".2f"},
        notes=notes,
    )


def _trace_name(path: Path) -> str:
    """``the conversation trace`` for a bundled trace, else the file's name."""
    for name in BUNDLED_TRACES:
        if path == bundled_trace(name):
            return f"the {name} trace"
    return path.name


def default_config(args: argparse.Namespace) -> Config:
    nvme = (
        None if args.no_nvme else NVMeConfig(num_blocks=args.nvme_blocks, directory=args.nvme_dir)
    )
    return Config(
        block_bytes=args.block_kib * 1024,
        gpu=GPUConfig(num_blocks=args.concurrency * 256, device=args.device),
        cpu=TierConfig(num_blocks=args.cpu_blocks, policy=args.policy),
        nvme=nvme,
        write_mode=args.write_mode,
        remote=None if args.remote is None else RemoteConfig(url=args.remote),
    )
