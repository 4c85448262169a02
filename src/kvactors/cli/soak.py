"""A soak run: many concurrent requests across every tier, with faults injected.

Clients store, load (with ``partial=True``) and prefetch random prefixes of a
shared key space while the NVMe store fails some writes with ``ENOSPC`` and
flips bytes in some reads, through its fault hook (``FileStore.faults``, asked
on the I/O path users run, the compiled loop included). At the end:

- every loaded block was checked against the bytes derived from its key
  (``wrong_bytes`` must be 0);
- once the cache is idle (see :func:`settle`), a model built only from the
  cache's own events says which keys should be present; a key it holds that
  ``lookup`` cannot find was lost silently (``lost`` must be 0);
- every tier has no pins, no blocks being written, and ``used + free == capacity``.
"""

from __future__ import annotations

import random
import time
from typing import Any

import anyio
import msgspec
import torch

import kvactors
from kvactors.cache.handle import KVCache
from kvactors.cache.results import CacheStats
from kvactors.cli.demo import block_bytes_for
from kvactors.config import Config, GPUConfig, NVMeConfig, TierConfig
from kvactors.errors import KVActorsError
from kvactors.media.faults import InjectedFaults

__all__ = ["SoakResult", "run_soak", "settle"]


class SoakResult(msgspec.Struct, frozen=True):
    seconds: float
    operations: int
    stores: int
    loads: int
    blocks_verified: int
    faults_injected: int
    errors_seen: int
    wrong_bytes: int
    lost: int
    invariants_ok: bool
    events_dropped: int


async def settle(kv: KVCache) -> CacheStats:
    """Wait until the cache does nothing, then return its stats.

    Once every client has returned, only hints (prefetches) can still be at work,
    and only in the coordinator, which starts every handshake: it is idle when no
    message waits in its mailbox and none is in hand. A handshake still in hand
    may hold no pin and no block being written and yet change the tiers: a
    prefetch whose read failed its checksum drops that block only after its plan
    completed. Counting the model's keys before that drop counts the block lost.
    """
    while True:
        stats = await kv.stats()
        coord = stats.actors[0]
        if coord.mailbox_depth == 0 and coord.in_hand == 0:
            return stats
        await anyio.sleep(0.01)


async def run_soak(
    *,
    seconds: float = 5.0,
    clients: int = 8,
    keys: int = 400,
    seed: int = 0,
    p_write_fault: float = 0.02,
    p_read_fault: float = 0.02,
    block_bytes: int = 4096,
) -> SoakResult:
    """Run the soak for about ``seconds`` and return what it saw."""
    longest = 16
    config = Config(
        block_bytes=block_bytes,
        gpu=GPUConfig(num_blocks=clients * longest, device="cpu"),
        cpu=TierConfig(num_blocks=keys // 8),
        nvme=NVMeConfig(num_blocks=keys // 2, backend="posix"),
        mailbox_size=16,
        max_inflight=8,
        event_buffer=1_000_000,
    )
    counts = {"ops": 0, "stores": 0, "loads": 0, "verified": 0, "errors": 0, "wrong": 0}
    model: dict[Any, set[str]] = {}
    start = time.perf_counter()
    async with kvactors.open(config) as kv:
        nvme: Any = kv.medium("nvme")
        faults = InjectedFaults(seed, p_write=p_write_fault, p_corrupt=p_read_fault)
        nvme.faults = faults
        events: Any = await kv.events()
        pool: Any = kv.gpu_pool
        dev = pool.device
        deadline = time.perf_counter() + seconds

        async def client(c: int) -> None:
            crng = random.Random(seed * 1000 + c)
            slots = list(range(c * longest, (c + 1) * longest))
            while time.perf_counter() < deadline:
                first = crng.randrange(keys)
                n = crng.randint(1, longest)
                chunk = [(first + i) % keys for i in range(n)]
                if len(set(chunk)) != len(chunk):
                    continue
                op = crng.random()
                try:
                    with anyio.move_on_after(crng.choice([None, 0.0005, 0.005])):
                        if op < 0.45:
                            pool.write_rows(slots[:n], block_bytes_for(chunk, block_bytes, dev))
                            await kv.store(chunk, slots[:n])
                            counts["stores"] += 1
                        elif op < 0.9:
                            res = await kv.load(chunk, slots[:n], partial=True)
                            got = len(res.tiers)
                            want = block_bytes_for(chunk[:got], block_bytes, dev)
                            if not torch.equal(pool.rows(slots[:got]), want):
                                counts["wrong"] += 1
                            counts["verified"] += got
                            counts["loads"] += 1
                        else:
                            kv.prefetch(chunk)
                except KVActorsError:
                    counts["errors"] += 1
                counts["ops"] += 1

        async with anyio.create_task_group() as tg:
            for c in range(clients):
                tg.start_soon(client, c)

        with anyio.fail_after(30):
            stats = await settle(kv)
        with events:
            while True:
                try:
                    ev = events.receive_nowait()
                except anyio.WouldBlock:
                    break
                for key in ev.keys:
                    tiers = model.setdefault(key, set())
                    if ev.kind in ("stored", "promoted", "demoted"):
                        tiers.add(ev.tier)
                    elif ev.kind in ("removed", "corrupted"):
                        tiers.discard(ev.tier)
        present = [k for k, tiers in model.items() if tiers]
        lost = 0
        for i in range(0, len(present), 64):
            chunk = present[i : i + 64]
            for k in chunk:
                if (await kv.lookup([k])).hits != 1:
                    lost += 1
        ok = all(
            t.pinned == 0 and t.being_written == 0 and t.used + t.free == t.capacity
            for t in stats.policy.tiers.values()
        )
        result = SoakResult(
            seconds=time.perf_counter() - start,
            operations=counts["ops"],
            stores=counts["stores"],
            loads=counts["loads"],
            blocks_verified=counts["verified"],
            faults_injected=faults.count,
            errors_seen=counts["errors"],
            wrong_bytes=counts["wrong"],
            lost=lost,
            invariants_ok=ok,
            events_dropped=stats.policy.events_dropped,
        )
    return result
