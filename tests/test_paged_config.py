"""KVCacheConfig sizes and validation, and the block keys' stability."""

from __future__ import annotations

import hashlib
import re
import struct
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvactors.errors import ConfigError, PagedCacheError
from kvactors.paged import (
    BlockAllocator,
    KVCacheConfig,
    KVTensors,
    MemoryPressure,
    hash_block,
    hash_blocks,
    hash_tail,
    root_key,
)
from kvactors.paged.hashing import pack_tokens

BASE: dict[str, Any] = {
    "num_layers": 2,
    "num_kv_heads": 4,
    "head_dim": 8,
    "num_gpu_blocks": 10,
    "dtype": "float16",
    "block_size": 16,
}


def make(**changes: Any) -> KVCacheConfig:
    return KVCacheConfig(**{**BASE, **changes})


def test_sizes_are_derived_from_the_layout() -> None:
    c = make()
    assert c.kv_size_per_token == 2 * 2 * 4 * 8 * 2  # k+v, layers, heads, dim, fp16
    assert c.block_size_bytes == 16 * 256
    assert (c.blocks_per_offload, c.offload_bytes) == (1, 4096)
    assert c.watermark_blocks == 1  # ceil(0.1 * 10)


@pytest.mark.parametrize(
    ("dtype", "itemsize"),
    [("float32", 4), ("bfloat16", 2), ("float8_e4m3fn", 1), ("float8_e5m2", 1)],
)
def test_dtype_sets_the_size(dtype: str, itemsize: int) -> None:
    assert make(dtype=dtype).kv_size_per_token == 2 * 2 * 4 * 8 * itemsize


def test_offload_block_packs_whole_blocks() -> None:
    c = make(offload_block_bytes=3 * 4096)
    assert (c.blocks_per_offload, c.offload_bytes) == (3, 3 * 4096)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_kv_heads": 0}, "num_kv_heads"),
        ({"num_layers": 1.5}, "num_layers"),
        ({"head_dim": -8}, "head_dim"),
        ({"num_gpu_blocks": 0}, "num_gpu_blocks"),
        ({"block_size": 0}, "block_size"),
        ({"dtype": "int8"}, "dtype"),
        ({"dtype": "torch.float16"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"device": "cuda:x"}, "device"),
        ({"device": "cuda:01"}, "device"),
        ({"device": "cuda:+1"}, "device"),
        ({"device": "cuda: 1"}, "device"),
        ({"device": "cuda:1x"}, "device"),
        ({"device": "cuda:\u00b2"}, "device"),  # a digit to str.isdigit, not to int()
        ({"device": 0}, "device"),
        ({"namespace": 3}, "namespace"),
        ({"offload_block_bytes": 6000}, "block_size"),  # 4096 does not divide it
        ({"offload_block_bytes": 0}, "offload_block_bytes"),
        ({"watermark": 1.0}, "watermark"),
        ({"watermark": -0.1}, "watermark"),
        ({"watermark": float("nan")}, "watermark"),
    ],
)
def test_a_wrong_value_names_its_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        make(**changes)
    assert str(info.value).startswith(f"{field}:")


def test_block_key_is_pinned_blake2b_of_parent_and_int64_tokens() -> None:
    """The same bytes in every process and on every machine: never Python's hash()."""
    parent = bytes(32)
    key = hash_block(parent, [1, 2, 3, 4])
    expected = hashlib.blake2b(
        parent + struct.pack("<4q", 1, 2, 3, 4), digest_size=32, person=b"kvactors.block"
    ).digest()
    assert key == expected
    assert key.hex() == "cb409e35bc3863d9e4c4b690e2b76e9f9ffc7a2eebbf436a6b3c7a0236f37438"
    tail = hash_tail(parent, [1, 2, 3, 4])
    assert tail.hex() == "feac9e147d563bb5b677ae74085ffa8f0cb84b7118c509c9f97f5e7b1b4af9b1"
    assert root_key(make()).hex() == (
        "93467034a58b1f855d7a04597b2e59d816304abf773352ee4eb7a690124980ac"
    )


def test_keys_chain_over_full_blocks_only() -> None:
    root = root_key(make())
    tokens = list(range(10))
    keys = hash_blocks(root, tokens, 4)
    assert keys == [hash_block(root, [0, 1, 2, 3]), hash_block(keys[0], [4, 5, 6, 7])]
    assert hash_blocks(keys[0], tokens, 4, start=1) == keys[1:]
    # A different first block changes every later key.
    assert hash_blocks(root, [9, *tokens[1:]], 4)[1] != keys[1]


def test_root_covers_layout_and_namespace_only() -> None:
    base = root_key(make())
    assert root_key(make(num_gpu_blocks=99, device="auto", watermark=0.5)) == base
    assert root_key(make(namespace="model-b")) != base
    assert root_key(make(dtype="bfloat16")) != base
    assert root_key(make(offload_block_bytes=8192)) != base


@pytest.mark.parametrize("bad", [1.5, 2**63, "a", None, True, False])
def test_a_token_that_is_not_an_int64_is_refused(bad: Any) -> None:
    message = f"^token id {re.escape(repr(bad))} is not an int64"
    for call in (hash_block, hash_tail, lambda p, t: hash_blocks(p, t, 2)):
        with pytest.raises(PagedCacheError, match=message):
            call(bytes(32), [1, bad, 3, 4])
    with pytest.raises(PagedCacheError, match=message):
        pack_tokens([bad])


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=40),
    st.integers(1, 8),
    st.integers(0, 6),
)
def test_hash_blocks_chains_hash_block_over_each_full_block(
    tokens: list[int], block_size: int, start: int
) -> None:
    """``hash_blocks`` from block ``start`` equals ``hash_block`` chained block by block."""
    parent = want_parent = bytes(range(32))
    want = []
    for i in range(start, len(tokens) // block_size):
        want_parent = hash_block(want_parent, tokens[i * block_size : (i + 1) * block_size])
        want.append(want_parent)
    assert hash_blocks(parent, tokens, block_size, start) == want
    assert hash_blocks(parent, tuple(tokens), block_size, start) == want


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_kv_tensors_on_cuda_without_cuda_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^device: 'cuda' asked for, but CUDA is not available"):
        KVTensors(make(device="cuda"))


@pytest.mark.parametrize(
    ("watermark", "num_gpu_blocks", "blocks"),
    [(0.07, 100, 7), (0.29, 100, 29), (0.1, 4096, 410), (0.0, 10, 0), (0.5, 3, 2), (1e-05, 10, 1)],
)
def test_watermark_blocks_is_the_exact_decimal_rounded_up(
    watermark: float, num_gpu_blocks: int, blocks: int
) -> None:
    """docs/paged.md: ``watermark × num_gpu_blocks`` rounded up, from the decimal
    written (0.07 * 100 is 7.000000000000001 as floats, which would give 8)."""
    c = make(watermark=watermark, num_gpu_blocks=num_gpu_blocks)
    assert c.watermark_blocks == blocks
    a = BlockAllocator.from_config(c)
    assert a.stats().num_blocks == num_gpu_blocks
    seen: list[MemoryPressure] = []
    a.add_pressure_callback(seen.append)
    # take blocks one at a time: pressure starts exactly when fewer than `blocks` are left
    for i in range(num_gpu_blocks):
        a.allocate(f"r{i}", [i] * 1)
        empty = num_gpu_blocks - i - 1
        assert bool(seen) == (empty < blocks), (i, empty, seen)
        seen.clear()


def test_the_key_functions_refuse_what_is_not_a_key_or_a_count_by_name() -> None:
    """hash_block / hash_tail / hash_blocks with a parent that is not bytes raised
    TypeError from the concatenation, hash_blocks with block_size 0
    ZeroDivisionError, root_key of something else AttributeError, and a
    BlockAllocator with a str root failed its first allocate."""
    parent_error = r"parent must be bytes \(the previous block's key or the root key\), got "
    with pytest.raises(PagedCacheError, match=rf"^hash_block: {parent_error}str$"):
        hash_block("root", [1])  # type: ignore[arg-type]
    with pytest.raises(PagedCacheError, match=rf"^hash_tail: {parent_error}NoneType$"):
        hash_tail(None, [1])  # type: ignore[arg-type]
    with pytest.raises(PagedCacheError, match=rf"^hash_blocks: {parent_error}bytearray$"):
        hash_blocks(bytearray(), [1, 2], 1)  # type: ignore[arg-type]
    with pytest.raises(PagedCacheError, match=r"^hash_blocks: block_size must be an int >= 1"):
        hash_blocks(b"", [1, 2], 0)
    with pytest.raises(PagedCacheError, match=r"^hash_blocks: start must be an int >= 0"):
        hash_blocks(b"", [1, 2], 1, -1)
    with pytest.raises(ConfigError, match=r"^config: expected a KVCacheConfig, got dict$"):
        root_key({})  # type: ignore[arg-type]
    with pytest.raises(PagedCacheError, match=r"^root: expected bytes \(a root key\), got str$"):
        BlockAllocator(4, 2, root="model")  # type: ignore[arg-type]
    assert hash_blocks(b"r", [1, 2, 3, 4], 2) == [
        hash_block(b"r", [1, 2]),
        hash_block(hash_block(b"r", [1, 2]), [3, 4]),
    ]


@pytest.mark.parametrize("watermark", [Fraction(7, 100), Decimal("0.07"), "0.1", True])
def test_a_watermark_of_another_type_is_refused_saying_which_types_it_takes(
    watermark: object,
) -> None:
    """The message said 'expected a fraction in [0, 1), got Fraction(7, 100)',
    refusing a fraction in [0, 1) for wanting one; it names the types taken."""
    with pytest.raises(
        ConfigError, match=r"^watermark: expected an int or a float in \[0, 1\), got "
    ):
        make(watermark=watermark)
