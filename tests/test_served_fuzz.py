"""A hypothesis-driven fuzz of the public async API: hostile keys, slot lists and
tensors, concurrent callers and random cancellation. Whatever happens, every
error is typed, no pin or half-written block is left, and no wrong byte is
ever served; in odd geometries too (one-block tiers, blocks of a few bytes,
more stripes than slots), where a reopen after a clean close finds every block
the NVMe index held."""

from __future__ import annotations

import hashlib
import tempfile
from typing import Any

import anyio
import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import kvactors
from _served import settled
from kvactors.cli.demo import block_bytes_for
from kvactors.config import Config, GPUConfig, NVMeConfig, TierConfig
from kvactors.errors import (
    BlockNotFoundError,
    IntegrityError,
    InvalidKeyError,
    KVActorsError,
    TensorSpecError,
)

BB = 1024
LANES = 3
LANE_SLOTS = 8
CPU = torch.device("cpu")

valid_keys = st.lists(st.integers(0, 30), min_size=1, max_size=6, unique=True)
hostile_key = st.one_of(
    st.floats(allow_nan=True),
    st.text(max_size=2),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.builds(object),
)
hostile_keys = st.one_of(
    st.tuples(valid_keys, hostile_key, st.integers(0, 6)).map(
        lambda t: [*t[0][: t[2]], t[1], *t[0][t[2] :]]
    ),
    st.binary(min_size=1, max_size=4),
    st.text(min_size=1, max_size=3),
    st.integers(),
    st.none(),
    st.sets(st.integers(0, 5), min_size=1, max_size=3),
    st.just([]),
    valid_keys.map(lambda ks: [*ks, ks[0]]),  # a key named twice
)
sides = st.sampled_from(
    [
        "slots",
        "tensor",
        "floats",
        "string",
        "set",
        "short",
        "out_of_range",
        "twice",
        "bad_shape",
        "strided",
        "meta",
        "float_tensor",
    ]
)
ops = st.tuples(
    st.sampled_from(["store", "load", "load_partial", "lookup", "prefetch"]),
    st.one_of(valid_keys, valid_keys, valid_keys, hostile_keys),
    sides,
    st.one_of(st.none(), st.floats(0, 0.003)),
)


def config(write_mode: str) -> Config:
    return Config(
        block_bytes=BB,
        gpu=GPUConfig(num_blocks=LANES * LANE_SLOTS, device="cpu"),
        cpu=TierConfig(num_blocks=6, threads=2),
        nvme=NVMeConfig(num_blocks=24, backend="posix", threads=2),
        write_mode=write_mode,  # type: ignore[arg-type]
        inline_bytes=0,  # every copy in a thread: cancellations land mid-transfer
        max_inflight=2,
        mailbox_size=4,
    )


def make_side(kind: str, keys: Any, lane: int, store: bool) -> tuple[Any, bool]:
    """The ``src``/``dst`` of one call, and whether it is a valid one."""
    n = len(keys) if isinstance(keys, list) and keys else 2
    slots = list(range(lane * LANE_SLOTS, lane * LANE_SLOTS + n))
    if kind == "slots":
        return slots, True
    if kind == "tensor":
        if store and isinstance(keys, list) and all(type(k) is int for k in keys):
            return block_bytes_for(keys, BB, CPU), True
        return torch.zeros(n, BB, dtype=torch.uint8), True
    return {
        "floats": [s + 0.5 for s in slots],
        "string": "01"[:n],
        "set": set(slots),
        "short": slots[:-1],
        "out_of_range": [*slots[:-1], 10_000],
        "twice": [slots[0]] * max(n, 2),
        "bad_shape": torch.zeros(n, BB - 1, dtype=torch.uint8),
        # Every other byte of wider rows: not contiguous whatever n is (a single row
        # of a transposed (BB, 1) tensor would count as contiguous).
        "strided": torch.zeros(n, 2 * BB, dtype=torch.uint8)[:, ::2],
        "meta": torch.empty(n, BB, dtype=torch.uint8, device="meta"),
        "float_tensor": torch.zeros(n, BB // 4 + 1, dtype=torch.float32),
    }[kind], False


async def run_op(kv: kvactors.KVCache, op: Any, lane: int, seen: dict[str, int]) -> None:
    kind, keys, side_kind, cancel_after = op
    good_keys = isinstance(keys, list) and bool(keys) and len(set(map(repr, keys))) == len(keys)
    good_keys = good_keys and all(type(k) is int for k in keys)
    if kind in ("lookup", "prefetch"):
        try:
            if kind == "lookup":
                found = await kv.lookup(keys)
                assert found.hits <= len(keys)
            else:
                kv.prefetch(keys)
        except InvalidKeyError:
            assert not good_keys
            seen["rejected"] += 1
            return
        assert good_keys
        return
    store = kind == "store"
    side, good_side = make_side(side_kind, keys, lane, store)
    if store and good_keys and good_side and isinstance(side, list):
        kv.gpu_pool.write_rows(side, block_bytes_for(keys, BB, CPU))
    with anyio.move_on_after(cancel_after) if cancel_after is not None else _null():
        try:
            if store:
                await kv.store(keys, side)
                seen["stored"] += 1
                return
            result = await kv.load(keys, side, partial=kind == "load_partial")
        except (InvalidKeyError, TensorSpecError):
            assert not (good_keys and good_side), (keys, side_kind)
            seen["rejected"] += 1
            return
        except KVActorsError:  # BlockNotFoundError, an IntegrityError: typed, fine
            assert good_keys
            assert good_side
            seen["failed"] += 1
            return
        assert good_keys
        assert good_side
        n = len(result.tiers)
        got = side[:n] if isinstance(side, torch.Tensor) else kv.gpu_pool.rows(side[:n])
        assert torch.equal(got, block_bytes_for(keys[:n], BB, CPU)), "a wrong byte served"
        seen["loaded"] += n


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


async def check_consistent(kv: kvactors.KVCache) -> None:
    with anyio.fail_after(10):
        while True:
            stats = await kv.stats()
            if all(t.pinned == t.being_written == 0 for t in stats.policy.tiers.values()):
                break
            await anyio.sleep(0.01)
    for tier in stats.policy.tiers.values():
        assert tier.used + tier.free == tier.capacity
    # Everything served now is byte-exact.
    for key in range(31):
        if (await kv.lookup([key])).hits:
            out = torch.empty(1, BB, dtype=torch.uint8)
            await kv.load([key], out)
            assert torch.equal(out, block_bytes_for([key], BB, CPU)), f"key {key} corrupted"


@pytest.mark.parametrize("write_mode", ["write_back", "write_through"])
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(program=st.lists(ops, min_size=1, max_size=24))
def test_hostile_calls_and_cancellations_leave_no_pin_and_no_wrong_byte(
    write_mode: str, program: list[Any]
) -> None:
    seen = {"stored": 0, "loaded": 0, "rejected": 0, "failed": 0}

    async def main() -> None:
        with anyio.fail_after(60):
            async with kvactors.open(config(write_mode)) as kv:
                for start in range(0, len(program), LANES):
                    async with anyio.create_task_group() as tg:
                        for lane, op in enumerate(program[start : start + LANES]):
                            tg.start_soon(run_op, kv, op, lane, seen)
                await check_consistent(kv)

    anyio.run(main)


# -- odd geometries: one-block tiers, tiny blocks, many stripes, a durable directory --

ODD_KEYS: list[Any] = [0, 1, 2, 3, 2**70, b"a", b"bb", b""]


def odd_block(key: Any, block_bytes: int) -> torch.Tensor:
    """The known bytes of ``key``'s block (any key, any block size)."""
    seed = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (block_bytes,), dtype=torch.uint8, generator=gen)


def odd_blocks(keys: list[Any], block_bytes: int) -> torch.Tensor:
    return torch.stack([odd_block(k, block_bytes) for k in keys])


odd_configs = st.builds(
    lambda bb, cpu, nvme, stripes, mode, inline, inflight, mailbox: (
        bb,
        cpu,
        nvme,
        stripes,
        mode,
        inline,
        inflight,
        mailbox,
    ),
    st.sampled_from([1, 3, 64, 4096]),
    st.integers(1, 3),
    st.integers(1, 4),
    st.sampled_from([1, 2, 7, 64]),
    st.sampled_from(["write_back", "write_through"]),
    st.sampled_from([0, 4 * 2**20]),
    st.integers(1, 3),
    st.integers(1, 4),
)
odd_ops = st.tuples(
    st.sampled_from(["store", "load", "load_partial", "lookup", "prefetch"]),
    st.lists(st.sampled_from(ODD_KEYS), min_size=1, max_size=3, unique=True),
    st.booleans(),  # a tensor (True) or GPU-pool slots
    st.one_of(st.none(), st.floats(0, 0.002)),
)


def odd_config(params: tuple[Any, ...], directory: str) -> Config:
    bb, cpu, nvme, stripes, mode, inline, inflight, mailbox = params
    return Config(
        block_bytes=bb,
        gpu=GPUConfig(num_blocks=LANES * 3, device="cpu"),
        cpu=TierConfig(num_blocks=cpu, threads=1),
        nvme=NVMeConfig(
            num_blocks=nvme, backend="posix", threads=2, stripes=stripes, directory=directory
        ),
        write_mode=mode,
        inline_bytes=inline,
        max_inflight=inflight,
        mailbox_size=mailbox,
    )


async def odd_op(kv: kvactors.KVCache, op: Any, lane: int) -> None:
    kind, keys, tensor, cancel_after = op
    bb = kv.config.block_bytes
    if kind == "lookup":
        assert (await kv.lookup(keys)).hits <= len(keys)
        return
    if kind == "prefetch":
        kv.prefetch(keys)
        return
    slots = list(range(lane * 3, lane * 3 + len(keys)))
    store = kind == "store"
    side: Any = slots
    if tensor:
        side = odd_blocks(keys, bb) if store else torch.zeros(len(keys), bb, dtype=torch.uint8)
    elif store:
        kv.gpu_pool.write_rows(slots, odd_blocks(keys, bb))
    with anyio.move_on_after(cancel_after) if cancel_after is not None else _null():
        try:
            if store:
                result = await kv.store(keys, side)
                if result is not None:
                    assert result.stored + result.present == len(keys)
                    assert set(result.durable) <= set(keys)
                return
            loaded = await kv.load(keys, side, partial=kind == "load_partial")
        except BlockNotFoundError:  # a whole load of keys not all cached: no fault is injected
            assert kind == "load"
            return
        n = len(loaded.tiers)
        got = side[:n] if tensor else kv.gpu_pool.rows(slots[:n])
        assert torch.equal(got, odd_blocks(keys, bb)[:n]), "a wrong byte served"


async def check_odd(kv: kvactors.KVCache) -> set[Any]:
    """No pin left, used + free == capacity, every block served byte-exact;
    returns the keys the NVMe index holds."""
    stats = await settled(kv)
    for tier in stats.policy.tiers.values():
        assert tier.used + tier.free == tier.capacity
        assert 0 <= tier.used <= tier.capacity
    bb = kv.config.block_bytes
    for key in ODD_KEYS:
        out = torch.zeros(1, bb, dtype=torch.uint8)
        try:
            if not (await kv.load([key], out, partial=True)).tiers:
                continue
        except IntegrityError:
            continue
        assert torch.equal(out[0], odd_block(key, bb)), f"key {key!r} corrupted"
    await settled(kv)
    return set(kv.medium("nvme").index.by_key)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(params=odd_configs, program=st.lists(odd_ops, min_size=1, max_size=18))
def test_odd_geometries_keep_every_invariant_and_reopen_what_nvme_held(
    params: tuple[Any, ...], program: list[Any]
) -> None:
    async def main(directory: str) -> None:
        config = odd_config(params, directory)
        with anyio.fail_after(60):
            async with kvactors.open(config) as kv:
                for start in range(0, len(program), LANES):
                    async with anyio.create_task_group() as tg:
                        for lane, op in enumerate(program[start : start + LANES]):
                            tg.start_soon(odd_op, kv, op, lane)
                on_nvme = await check_odd(kv)
            # Reopened after a clean close: what the NVMe index held is there.
            async with kvactors.open(config) as kv:
                found = await kv.lookup(sorted(on_nvme, key=repr)) if on_nvme else None
                assert found is None or found.tiers == ["nvme"] * len(on_nvme)
                assert await check_odd(kv) == on_nvme

    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(main, tmp + "/nvme")
