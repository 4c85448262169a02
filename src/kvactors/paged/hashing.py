"""Block keys: chained hashes of token ids, stable across processes and machines.

A full block's key is ``blake2b(parent_key || token ids as little-endian int64)``
with a 32-byte digest, so it names the block's tokens *and* everything before
them. The chain starts at a root key that mixes in the KV layout and a
namespace (the model), so two models never share keys in one offload store.
A sequence's tail (tokens after its last whole offload block) gets its own key
from a separate domain, so it can never collide with a full block's key.

Python's ``hash()`` is never used: it is salted per process.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import msgspec

from kvactors.errors import PagedCacheError
from kvactors.paged.config import KVCacheConfig

__all__ = ["DIGEST_SIZE", "hash_block", "hash_blocks", "hash_tail", "pack_tokens", "root_key"]

DIGEST_SIZE = 32


def pack_tokens(token_ids: Sequence[int]) -> bytes:
    """``token_ids`` as little-endian int64s.

    Raises :class:`~kvactors.errors.PagedCacheError` if one is not an int64 (a
    ``bool`` is not one, though ``struct`` would pack it as 0 or 1).
    """
    try:
        packed = struct.pack(f"<{len(token_ids)}q", *token_ids)
    except struct.error:
        for token in token_ids:
            if type(token) is not int or not -(2**63) <= token < 2**63:
                raise _not_a_token(token) from None
        raise  # pragma: no cover - struct rejected something the loop accepts
    if bool in set(map(type, token_ids)):
        raise _not_a_token(next(t for t in token_ids if type(t) is bool))
    return packed


def _not_a_token(token: object) -> PagedCacheError:
    return PagedCacheError(f"token id {token!r} is not an int64; token ids must be ints")


def _digest(person: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE, person=person).digest()


def root_key(config: KVCacheConfig) -> bytes:
    """The parent key of every sequence's first block for caches laid out like ``config``.

    It covers what changes the bytes of a block (layer count, heads, head size,
    dtype, block size, blocks per offload block) and ``config.namespace``; the
    pool size, device and watermark do not change it.
    """
    layout = (
        config.num_layers,
        config.num_kv_heads,
        config.head_dim,
        config.dtype,
        config.block_size,
        config.blocks_per_offload,
        config.namespace,
    )
    return _digest(b"kvactors.root", msgspec.json.encode(layout))


def hash_block(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The key of a full block of ``token_ids`` whose predecessor's key is ``parent``."""
    return _digest(b"kvactors.block", parent + pack_tokens(token_ids))


def hash_tail(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The key of a sequence's tail ``token_ids`` following the block keyed ``parent``."""
    return _digest(b"kvactors.tail", parent + pack_tokens(token_ids))


def hash_blocks(
    parent: bytes, token_ids: Sequence[int], block_size: int, start: int = 0
) -> list[bytes]:
    """Chained keys of the full blocks of ``token_ids`` from block index ``start`` on.

    ``parent`` is the key of block ``start - 1`` (the root key when ``start`` is 0).
    Raises :class:`~kvactors.errors.PagedCacheError` for a token id that is not an int64.
    """
    full = len(token_ids) // block_size
    if full <= start:
        return []
    # Packed (and checked) once; each block's key is hash_block's over its bytes.
    data = pack_tokens(token_ids[start * block_size : full * block_size])
    step = 8 * block_size
    keys: list[bytes] = []
    for i in range(0, len(data), step):
        parent = _digest(b"kvactors.block", parent + data[i : i + step])
        keys.append(parent)
    return keys
