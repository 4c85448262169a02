"""Every error kvactors raises, under one root.

Each class is one line of meaning; the docstring says when it is raised.
"Cannot store now" is *not* an error: ``prepare_store`` returns ``None``.
"""

from __future__ import annotations


class KVActorsError(Exception):
    """Root of every error raised by kvactors."""


class ConfigError(KVActorsError, ValueError):
    """A configuration value is wrong; the message names the field."""


class UnknownPolicyError(ConfigError):
    """An eviction policy name is not one kvactors knows; the message lists those it does."""


class InvalidKeyError(KVActorsError, TypeError):
    """A block key is not ``bytes`` or ``int``, or a call names the same key twice."""


class BlockStateError(KVActorsError, LookupError):
    """A key is absent or in the wrong state for the call (not ready, not pinned, ...)."""


class BlockNotFoundError(BlockStateError):
    """A key that must be present is not."""


class BlockNotReadyError(BlockStateError):
    """A key is present but still being written (ref count -1)."""


class BlockNotPinnedError(BlockStateError):
    """``complete_load`` named a key that no reader holds."""


class PolicyError(KVActorsError, RuntimeError):
    """A ``CachePolicy`` broke its contract (``evict`` returned a wrong count, a pinned,
    protected or unknown key); the message names the policy and the key."""


class ManagerBusyError(KVActorsError, RuntimeError):
    """A manager was called while already running a call on the same thread: a key's
    ``__hash__``/``__eq__`` or the policy called back into it."""


class TraceError(KVActorsError, ValueError):
    """A trace cannot be read or a line of it is malformed; the message names the file and line."""


class ActorClosed(KVActorsError):
    """The actor (or the whole cache) is closed; queued and new requests fail with this."""


class ActorStartError(KVActorsError):
    """An actor failed while starting; the cause is chained."""


class TierError(KVActorsError):
    """A tier failed a transfer; the cause is chained and the tier name is in the message."""


class TierFailed(TierError):
    """A tier actor crashed; the cache keeps serving from the other tiers.

    ``retry_after``: seconds after which the tier is tried again (``None``: never,
    it stays down)."""

    retry_after: float | None = None


class RemoteUnavailable(TierFailed):
    """The remote store (a Valkey / Redis server or every node a call needs) refused the
    connection, did not answer in time, refused the login (a wrong password) or
    denied the user a command or key of the tier (``NOPERM``, the server's ACL);
    the message names the server with any password masked. The tier is down for ``retry_after``
    seconds (``remote.retry_after``), then tried again."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after: float | None = retry_after


class TransferError(TierError):
    """Reading or writing block bytes failed (I/O error, disk full, short read)."""


class IntegrityError(TransferError):
    """Blocks read back from storage do not match their checksums (or were torn).

    ``keys`` lists them; they are removed from the cache and never served.
    """

    def __init__(self, message: str, keys: list[bytes | int] | None = None) -> None:
        super().__init__(message)
        self.keys: list[bytes | int] = list(keys or [])


class BlocksMissingError(IntegrityError):
    """Blocks a shared tier no longer holds (the server evicted them, they expired or
    were deleted): a miss, not damage. ``keys`` lists every block the read did not
    deliver, ``missing`` those absent (the rest failed their checks). They are
    dropped from the cache like damaged blocks, but counted and reported as missing."""

    def __init__(self, message: str, keys: list[bytes | int], missing: list[bytes | int]) -> None:
        super().__init__(message, keys)
        self.missing: list[bytes | int] = list(missing)


class CacheLockedError(KVActorsError):
    """Another process holds the NVMe directory of this cache."""


class StoreOpenError(ActorStartError):
    """The NVMe directory cannot be opened or set up (a file in its place, no
    permission, too many open files, ...); the message names the path and the
    ``OSError`` is chained."""


class IndexDamagedError(StoreOpenError):
    """A file of the NVMe directory is damaged in a way recovery does not repair by
    guessing (the geometry record, a directory or a FIFO where a file should be);
    the message names the file."""


class TensorSpecError(KVActorsError, ValueError):
    """A user tensor has the wrong shape, dtype, device or size for the blocks named."""


class PagedCacheError(KVActorsError):
    """Bad use of the paged KV cache (unknown request, table used after free, too large)."""


class OutOfBlocksError(PagedCacheError):
    """The paged KV cache cannot find enough free blocks, even after offloading."""
