"""The same stack with the GPU pool on CUDA and a pinned CPU tier (skipped without CUDA)."""

from __future__ import annotations

import anyio
import pytest
import torch

import kvactors
from kvactors.cli.demo import block_bytes_for
from kvactors.config import Config, GPUConfig, NVMeConfig, TierConfig

pytestmark = [pytest.mark.anyio, pytest.mark.cuda]

BB = 64 * 1024


async def test_cuda_pool_round_trip_through_every_tier() -> None:
    config = Config(
        block_bytes=BB,
        gpu=GPUConfig(num_blocks=64, device="cuda"),
        cpu=TierConfig(num_blocks=8),
        nvme=NVMeConfig(num_blocks=64, backend="posix"),
    )
    with anyio.fail_after(60):
        async with kvactors.open(config) as kv:
            pool = kv.gpu_pool
            assert pool.device.type == "cuda"  # type: ignore[attr-defined]
            assert kv.medium("cpu").pinned  # type: ignore[attr-defined]
            keys = list(range(24))
            want = block_bytes_for(keys, BB, torch.device("cuda"))
            pool.write_rows(keys, want)  # type: ignore[attr-defined]
            for i in range(0, 24, 8):
                await kv.store(keys[i : i + 8], keys[i : i + 8])
            dst = list(range(32, 56))
            res = await kv.load(keys, dst)
            assert res.tiers.count("nvme") == 16
            assert torch.equal(pool.rows(dst), want)  # type: ignore[attr-defined]
            # A user's CUDA tensor works as a destination too.
            out = torch.empty(24, BB, dtype=torch.uint8, device="cuda")
            await kv.load(keys, out)
            assert torch.equal(out, want)
