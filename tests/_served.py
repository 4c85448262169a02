"""What the served-cache tests share: a small cache's config, filling and reading
GPU-pool slots, waiting until no handshake is in flight, and the events so far."""

from __future__ import annotations

from typing import Any

import anyio
import torch

import kvactors
from kvactors.cli.demo import block_bytes_for
from kvactors.config import Config, GPUConfig, NVMeConfig, TierConfig

BB = 4096
CPU = torch.device("cpu")


def small_config(**changes: Any) -> Config:
    """GPU pool of 64 slots on the CPU, CPU tier of 8, POSIX NVMe of 64, 4 KiB blocks."""
    base = Config(
        block_bytes=BB,
        gpu=GPUConfig(num_blocks=64, device="cpu"),
        cpu=TierConfig(num_blocks=8),
        nvme=NVMeConfig(num_blocks=64, backend="posix"),
    )
    return base.replace(**changes) if changes else base


def fill(kv: kvactors.KVCache, keys: list[int], slots: list[int]) -> None:
    """Write each key's known bytes into GPU-pool ``slots``."""
    kv.gpu_pool.write_rows(slots, block_bytes_for(keys, BB, CPU))


def rows(kv: kvactors.KVCache, slots: list[int]) -> torch.Tensor:
    return kv.gpu_pool.rows(slots)


def drain(events: Any) -> list[kvactors.CacheEvent]:
    """The events published so far (the policy actor publishes as it handles)."""
    seen: list[kvactors.CacheEvent] = []
    while True:
        try:
            seen.append(events.receive_nowait())
        except anyio.WouldBlock:
            return seen


async def settled(kv: kvactors.KVCache) -> kvactors.CacheStats:
    """Stats once no handshake is in flight: no pins and no blocks being written."""
    with anyio.fail_after(10):
        while True:
            stats = await kv.stats()
            if all(t.pinned == t.being_written == 0 for t in stats.policy.tiers.values()):
                return stats
            await anyio.sleep(0.01)
