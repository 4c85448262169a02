"""An async serving loop on top of kvactors.

Each request carries its prompt's chained block hashes. The server loads the
longest cached prefix into GPU-pool slots in one step (``partial=True``),
"computes" the rest (here: fills the slots with bytes derived from the keys),
stores what it computed, and hints the next request's blocks with ``prefetch``.
Requests run concurrently under a limit, as an async engine would run them.

    python examples/async_serving.py --requests 200
"""

from __future__ import annotations

import argparse
import sys

import anyio
import torch

import kvactors
from kvactors.cli.arguments import positive_int
from kvactors.cli.demo import block_bytes_for
from kvactors.traces import bundled_trace, load_trace


async def serve(requests: list[list[int]], concurrency: int) -> dict[str, int]:
    longest = max(len(r) for r in requests)
    config = kvactors.Config(
        block_bytes=16 * 1024,
        gpu=kvactors.GPUConfig(num_blocks=concurrency * longest),
        cpu=kvactors.TierConfig(num_blocks=1024),
        nvme=kvactors.NVMeConfig(num_blocks=4096),
    )
    totals = {"requests": 0, "blocks": 0, "reused": 0, "computed": 0}
    free_ranges = list(range(concurrency))
    limiter = anyio.Semaphore(concurrency)
    async with kvactors.open(config) as kv:
        pool = kv.gpu_pool
        device = pool.device  # type: ignore[attr-defined]

        async def handle(blocks: list[int]) -> None:
            async with limiter:
                base = free_ranges.pop() * longest
                try:
                    slots = list(range(base, base + len(blocks)))
                    reused = len((await kv.load(blocks, slots, partial=True)).tiers)
                    got = pool.rows(slots[:reused])  # type: ignore[attr-defined]
                    want = block_bytes_for(blocks[:reused], config.block_bytes, device)
                    if not torch.equal(got, want):
                        raise SystemExit("a reused block differs from what was stored")
                    todo = blocks[reused:]
                    if todo:
                        rows = block_bytes_for(todo, config.block_bytes, device)
                        pool.write_rows(slots[reused:], rows)  # type: ignore[attr-defined]
                        await kv.store(todo, slots[reused:])
                    totals["requests"] += 1
                    totals["blocks"] += len(blocks)
                    totals["reused"] += reused
                    totals["computed"] += len(todo)
                finally:
                    free_ranges.append(base // longest)

        async with anyio.create_task_group() as tg:
            for i, blocks in enumerate(requests):
                if i + 1 < len(requests):
                    kv.prefetch(requests[i + 1])
                await limiter.acquire()  # admit a request only when a slot range is free
                limiter.release()
                tg.start_soon(handle, blocks)
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=positive_int, default=300)
    parser.add_argument("--concurrency", type=positive_int, default=4)
    args = parser.parse_args(argv)
    requests = [r.hash_ids for r in load_trace(bundled_trace("conversation"))][: args.requests]
    totals = anyio.run(serve, requests, args.concurrency)
    ratio = totals["reused"] / max(1, totals["blocks"])
    print(
        f"requests {totals['requests']}  blocks {totals['blocks']}  reused {totals['reused']}"
        f"  computed {totals['computed']}  reuse ratio {ratio:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
