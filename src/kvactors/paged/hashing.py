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
import operator
import struct
from collections.abc import Sequence

import msgspec

from kvactors.errors import ConfigError, PagedCacheError
from kvactors.paged.config import KVCacheConfig

__all__ = [
    "DIGEST_SIZE",
    "as_token_ids",
    "checked_token_ids",
    "hash_block",
    "hash_blocks",
    "hash_tail",
    "pack_tokens",
    "root_key",
]

DIGEST_SIZE = 32
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def pack_tokens(token_ids: Sequence[int]) -> bytes:
    """``token_ids`` as little-endian int64s.

    Raises :class:`~kvactors.errors.PagedCacheError` if one is not an int64 (a
    ``bool`` is not one, though ``struct`` would pack it as 0 or 1; neither is a
    float or a bool array element; a numpy or torch integer is).
    """
    return _pack(as_token_ids(token_ids))


def checked_token_ids(token_ids: Sequence[int]) -> Sequence[int]:
    """:func:`as_token_ids`, with the int64 range checked (as :func:`pack_tokens` does)."""
    tokens = as_token_ids(token_ids)
    _pack(tokens)
    return tokens


def _pack(tokens: Sequence[int]) -> bytes:
    """``tokens`` (ints) as little-endian int64s; PagedCacheError for one out of range."""
    try:
        return struct.pack(f"<{len(tokens)}q", *tokens)
    except struct.error:
        raise _not_a_token(next(t for t in tokens if not _INT64_MIN <= t <= _INT64_MAX)) from None


def as_token_ids(token_ids: Sequence[int]) -> Sequence[int]:
    """``token_ids`` with each one an ``int`` (numpy or torch integers converted).

    Raises :class:`~kvactors.errors.PagedCacheError` for one that is not an
    integer (a bool, a float, a bool or float array element); the int64 range is
    checked by :func:`pack_tokens`.
    """
    if set(map(type, token_ids)) <= {int}:
        return token_ids
    return [_as_token_id(t) for t in token_ids]


def _as_token_id(token: object) -> int:
    if type(token) is int:
        return token
    if isinstance(token, bool) or "bool" in str(getattr(token, "dtype", "")):
        raise _not_a_token(token)
    try:
        return operator.index(token)  # type: ignore[arg-type]
    except TypeError:
        raise _not_a_token(token) from None


def _not_a_token(token: object) -> PagedCacheError:
    return PagedCacheError(f"token id {token!r} is not an int64; token ids must be ints")


def _parent(parent: object, what: str) -> bytes:
    """``parent`` if it is ``bytes`` (a block key, or the root key); PagedCacheError otherwise."""
    if not isinstance(parent, bytes):
        raise PagedCacheError(
            f"{what}: parent must be bytes (the previous block's key or the root key), "
            f"got {type(parent).__name__}"
        )
    return parent


def _digest(person: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE, person=person).digest()


def root_key(config: KVCacheConfig) -> bytes:
    """The parent key of every sequence's first block for caches laid out like ``config``.

    It covers what changes the bytes of a block (layer count, heads, head size,
    dtype, block size, blocks per offload block) and ``config.namespace``; the
    pool size, device and watermark do not change it. ConfigError for a
    ``config`` that is not a :class:`KVCacheConfig`.
    """
    if not isinstance(config, KVCacheConfig):
        raise ConfigError(f"config: expected a KVCacheConfig, got {type(config).__name__}")
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
    return _digest(b"kvactors.block", _parent(parent, "hash_block") + pack_tokens(token_ids))


def hash_tail(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The key of a sequence's tail ``token_ids`` following the block keyed ``parent``."""
    return _digest(b"kvactors.tail", _parent(parent, "hash_tail") + pack_tokens(token_ids))


def hash_blocks(
    parent: bytes, token_ids: Sequence[int], block_size: int, start: int = 0
) -> list[bytes]:
    """Chained keys of the full blocks of ``token_ids`` from block index ``start`` on.

    ``parent`` is the key of block ``start - 1`` (the root key when ``start`` is 0).
    Raises :class:`~kvactors.errors.PagedCacheError` for a token id that is not an
    int64, a ``parent`` that is not bytes, or a ``block_size`` or ``start`` that is
    not an int (``>= 1``, ``>= 0``).
    """
    _parent(parent, "hash_blocks")
    for name, value, low in (("block_size", block_size, 1), ("start", start, 0)):
        if type(value) is not int or value < low:
            raise PagedCacheError(f"hash_blocks: {name} must be an int >= {low}, got {value!r}")
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
