"""The paged KV cache with its tensors on CUDA (skipped without a GPU)."""

from __future__ import annotations

import anyio
import pytest
import torch

import kvactors
from kvactors.config import Config, GPUConfig, TierConfig
from kvactors.paged import KVCacheConfig, KVTensors, PagedKVCache

pytestmark = [pytest.mark.anyio, pytest.mark.cuda]


def config(**changes: object) -> KVCacheConfig:
    fields: dict[str, object] = {
        "num_layers": 3,
        "num_kv_heads": 2,
        "head_dim": 64,
        "num_gpu_blocks": 16,
        "block_size": 4,
        "dtype": "bfloat16",
        "device": "cuda",
        "watermark": 0.0,
    }
    return KVCacheConfig(**{**fields, **changes})  # type: ignore[arg-type]


def randomize(kv: KVTensors) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    for t in kv.layers:
        raw = t.view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, generator=g, device="cuda", dtype=torch.uint8))


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
async def test_moves_on_cuda_are_bit_for_bit(dtype: str) -> None:
    kv = KVTensors(config(dtype=dtype))
    assert kv.device.type == "cuda"
    randomize(kv)
    before = [t.view(torch.uint8).clone() for t in kv.layers]
    pinned = torch.empty((3, kv.config.block_size_bytes), dtype=torch.uint8, pin_memory=True)
    kv.gather([5, 0, 9], out=pinned)  # device to pinned host memory
    assert torch.equal(pinned, kv.gather([5, 0, 9]).cpu())
    kv.scatter([1, 2, 3], pinned)  # host rows back into the pool
    kv.copy_blocks([1, 2], [2, 1])  # a swap
    for t, old in zip(kv.layers, before, strict=True):
        now = t.view(torch.uint8)
        assert torch.equal(now[:, [2, 1, 3]], old[:, [5, 0, 9]])
        assert torch.equal(now[:, [0, 4, 15]], old[:, [0, 4, 15]])


async def test_swap_round_trip_through_the_coordinator() -> None:
    c = config()
    tiers = Config(
        block_bytes=c.offload_bytes,
        gpu=GPUConfig(num_blocks=1, device="cpu"),
        cpu=TierConfig(num_blocks=32),
        nvme=None,
    )
    with anyio.fail_after(60):
        async with kvactors.open(tiers) as offloader:
            cache = PagedKVCache(c, offloader)
            randomize(cache.kv)
            await cache.allocate("r", list(range(22)))  # 6 blocks, the last partial
            ids = cache.allocator.get_block_table("r").block_ids
            want = cache.kv.gather(ids)
            out = await cache.swap_out("r")
            assert out.stored_blocks == 6
            await cache.allocate("x", list(range(100, 164)))  # every block reused
            for t in cache.kv.layers:
                t.zero_()
            cache.allocator.free("x", computed=False)
            back = await cache.swap_in(out)
            assert (back.num_cached_tokens, back.num_loaded_tokens) == (22, 22)
            got = cache.kv.gather(back.block_table.block_ids)
    assert torch.equal(got, want)
