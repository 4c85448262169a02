"""A step-based scheduler that never awaits a transfer.

Engines such as vLLM run a synchronous ``step()``: schedule, run the model,
repeat. This scheduler does the same. Each step it

1. admits waiting requests (at most ``--batch`` running) and starts their
   prefix loads with ``kv.submit_load(..., partial=True)``;
2. polls every running request's future with ``done()`` (no waiting): a
   finished load means the prefix is on the GPU, so the request "computes" its
   missing blocks and starts ``kv.submit_store``; a finished store retires it.

Only the loop between steps yields to the event loop, which is where the
kvactors actors do their work.

    python examples/sync_scheduler.py --requests 200
"""

from __future__ import annotations

import sys
from collections import deque
from typing import Any

import anyio
import anyio.lowlevel
from _serving import check_reused, compute, config, parse, report

import kvactors


class Request:
    def __init__(self, blocks: list[int], slots: list[int]) -> None:
        self.blocks = blocks
        self.slots = slots
        self.load: kvactors.Future[Any] | None = None
        self.store: kvactors.Future[Any] | None = None
        self.reused = 0


class Scheduler:
    def __init__(self, kv: kvactors.KVCache, requests: list[list[int]], batch: int) -> None:
        self.kv = kv
        self.pool: Any = kv.gpu_pool
        self.longest = max(len(r) for r in requests)
        self.waiting = deque(requests)
        self.free = list(range(batch))
        self.running: list[Request] = []
        self.steps = 0
        self.stats = {"requests": 0, "blocks": 0, "reused": 0}

    def step(self) -> None:
        """One synchronous scheduling step."""
        self.steps += 1
        while self.waiting and self.free:
            blocks = self.waiting.popleft()
            base = self.free.pop() * self.longest
            req = Request(blocks, list(range(base, base + len(blocks))))
            req.load = self.kv.submit_load(blocks, req.slots, partial=True)
            self.running.append(req)
        still: list[Request] = []
        for req in self.running:
            if req.store is None and req.load is not None and req.load.done():
                self._compute(req)
            if req.store is not None and req.store.done():
                req.store.result()  # raises if the store failed
                self._retire(req)
            else:
                still.append(req)
        self.running = still

    def _compute(self, req: Request) -> None:
        assert req.load is not None
        req.reused = len(req.load.result().tiers)
        check_reused(self.pool, req.blocks[: req.reused], req.slots[: req.reused])
        todo = req.blocks[req.reused :]
        if not todo:
            req.store = kvactors.Future()
            req.store.set_result(None)
            return
        compute(self.pool, todo, req.slots[req.reused :])
        req.store = self.kv.submit_store(todo, req.slots[req.reused :])

    def _retire(self, req: Request) -> None:
        self.free.append(req.slots[0] // self.longest)
        self.stats["requests"] += 1
        self.stats["blocks"] += len(req.blocks)
        self.stats["reused"] += req.reused

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)


async def run(requests: list[list[int]], batch: int) -> dict[str, int]:
    longest = max(len(r) for r in requests)
    async with kvactors.open(config(batch, longest)) as kv:
        sched = Scheduler(kv, requests, batch)
        while sched.busy:
            sched.step()
            await anyio.lowlevel.checkpoint()  # the step boundary: actors run here
    return {"steps": sched.steps} | sched.stats


def main(argv: list[str] | None = None) -> int:
    requests, batch = parse(argv, __doc__, "batch")
    report(anyio.run(run, requests, batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
