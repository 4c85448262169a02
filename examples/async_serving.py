"""An async serving loop on top of kvactors.

Each request carries its prompt's chained block hashes. The server loads the
longest cached prefix into GPU-pool slots in one step (``partial=True``),
"computes" the rest (here: fills the slots with bytes derived from the keys),
stores what it computed, and hints the next request's blocks with ``prefetch``.
Requests run concurrently under a limit, as an async engine would run them.

    python examples/async_serving.py --requests 200
"""

from __future__ import annotations

import sys

import anyio
from _serving import check_reused, compute, config, parse, report

import kvactors


async def serve(requests: list[list[int]], concurrency: int) -> dict[str, int]:
    longest = max(len(r) for r in requests)
    totals = {"requests": 0, "blocks": 0, "reused": 0, "computed": 0}
    free_ranges = list(range(concurrency))
    limiter = anyio.Semaphore(concurrency)
    async with kvactors.open(config(concurrency, longest)) as kv:
        pool = kv.gpu_pool

        async def handle(blocks: list[int]) -> None:
            async with limiter:
                base = free_ranges.pop() * longest
                try:
                    slots = list(range(base, base + len(blocks)))
                    reused = len((await kv.load(blocks, slots, partial=True)).tiers)
                    check_reused(pool, blocks[:reused], slots[:reused])
                    todo = blocks[reused:]
                    if todo:
                        compute(pool, todo, slots[reused:])
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
    requests, concurrency = parse(argv, __doc__, "concurrency")
    report(anyio.run(serve, requests, concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(main())
