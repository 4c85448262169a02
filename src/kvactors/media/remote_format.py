"""The remote value format: server keys, the fingerprint and each value's header.

One key per block, ``{namespace}:{fingerprint}:{key hex}``, where the
fingerprint hashes everything that makes bytes compatible (``block_bytes``,
the layout and model identity the user supplies, and :data:`FORMAT_VERSION`)
and the namespace, so engines running different models never see each other's
blocks, and a value copied from another namespace fails its header check. Each
value is a small header and the block's bytes::

    magic "KVR1" | fingerprint (8) | key length u16 | payload length u64 |
    xxh3-64 of the payload u64 | key | payload

A value that is absent (never stored, or evicted by the server), truncated,
garbage, or written under another fingerprint or key is a *miss*, counted and
reported, never bytes handed to the caller (see
:meth:`kvactors.media.remote_wire.RemoteIO.read_value`).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from typing import Any

from kvactors.errors import ConfigError
from kvactors.keys import Key

__all__ = [
    "FORMAT_VERSION",
    "HEAD",
    "HEADER_BYTES",
    "MAGIC",
    "ValueFormat",
    "encode_key",
    "fingerprint",
    "xxh3",
]

FORMAT_VERSION = 1
"""Version of the value format; part of the fingerprint, so a change starts a new namespace."""

MAGIC = b"KVR1"
HEAD = struct.Struct("<4s8sHQQ")  # magic, fingerprint, key length, payload length, xxh3
HEADER_BYTES = HEAD.size


def xxh3() -> Callable[[Any], int]:
    """The payload checksum (xxh3-64); ConfigError without the 'remote' extra."""
    try:
        import xxhash
    except ImportError:  # pragma: no cover - the remote extra installs it
        raise ConfigError(
            "remote: the remote tier needs the 'remote' extra: pip install 'kvactors[remote]'"
        ) from None
    fn: Callable[[Any], int] = xxhash.xxh3_64_intdigest
    return fn


def fingerprint(
    block_bytes: int, model: str = "", layout: str = "", namespace: str = "kvactors"
) -> bytes:
    """8 bytes naming what makes block bytes compatible between engines, and the
    namespace they share (so a value copied from another namespace fails the
    header check)."""
    text = (
        f"kvactors-remote/{FORMAT_VERSION}|block_bytes={block_bytes}|layout={layout}"
        f"|model={model}|namespace={namespace}"
    )
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def encode_key(key: Key) -> bytes:
    """A key as bytes, the same in every process (``int`` and ``bytes`` keys never collide)."""
    if type(key) is bytes:
        return b"b" + key
    assert isinstance(key, int)
    return b"i" + key.to_bytes((key.bit_length() + 8) // 8, "little", signed=True)


class ValueFormat:
    """The keys and values of one namespace and fingerprint, blocks of ``block_bytes``."""

    __slots__ = ("block_bytes", "fingerprint", "hash", "prefix")

    def __init__(self, namespace: str, block_bytes: int, model: str, layout: str) -> None:
        if any(c in namespace for c in "{}: ") or not namespace:
            raise ConfigError(
                f"remote.namespace: expected a non-empty name without '{{', '}}', ':' "
                f"or spaces, got {namespace!r}"
            )
        self.block_bytes = block_bytes
        self.fingerprint = fingerprint(block_bytes, model, layout, namespace)
        self.prefix = f"{namespace}:{self.fingerprint.hex()}:".encode()
        self.hash = xxh3()

    def redis_key(self, key: Key) -> bytes:
        """The server key of block ``key``."""
        return self.prefix + encode_key(key).hex().encode()

    def header(self, key: Key, payload: memoryview) -> bytes:
        """The header of a value holding ``payload`` as block ``key``."""
        raw = encode_key(key)
        head = HEAD.pack(MAGIC, self.fingerprint, len(raw), len(payload), self.hash(payload))
        return head + raw

    def digest(self, head: bytes | bytearray, raw: bytes) -> int | None:
        """The payload checksum ``head`` (header and encoded key ``raw``) announces if
        it is this format's header of block ``raw`` of ``block_bytes``; else ``None``."""
        magic, fp, klen, plen, digest = HEAD.unpack_from(head)
        if (
            magic != MAGIC
            or fp != self.fingerprint
            or klen != len(raw)
            or plen != self.block_bytes
            or head[HEADER_BYTES:] != raw
        ):
            return None
        result: int = digest
        return result
