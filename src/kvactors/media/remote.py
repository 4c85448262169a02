"""The remote medium: :class:`RemoteStore`, blocks in a Valkey / Redis server or cluster.

The store over three modules, one role each: :mod:`~kvactors.media.remote_format`
(server keys, the fingerprint naming compatible bytes, each value's header),
:mod:`~kvactors.media.remote_wire` (the commands and replies on a connection)
and :mod:`~kvactors.media.remote_nodes` (which node serves a key, which are
down). A value that is absent, truncated, garbage, or written under another
fingerprint or key is a *miss*, counted and reported, never bytes handed to
the caller.

Every call blocks (the tier actor runs it in a worker thread) and has stopped
writing into its destinations when it returns or raises. Reads into a
caller's buffer land in a staging buffer of the worker thread first; only a
value that passed every check is copied into the buffer. Reads into slots no
one else reads until the read is over (:meth:`RemoteStore.read_slots`: the
cache's own CPU slots being promoted into) land there straight off the
socket and are verified in place; a slot whose value failed a check is
reported missed, and its bytes are never served.

Failures: a server that refuses connections or does not answer within
``timeout`` raises :class:`~kvactors.errors.RemoteUnavailable` and is then
left alone for ``retry_after`` seconds; in a cluster, keys whose node is down
are misses while another node answers (see :mod:`~kvactors.media.remote_nodes`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import torch

from kvactors.config import MAX_BLOCKS
from kvactors.errors import (
    ActorClosed,
    BlocksMissingError,
    ConfigError,
    RemoteUnavailable,
    TransferError,
)
from kvactors.keys import Key
from kvactors.media.memory import row_buffers
from kvactors.media.remote_format import (
    FORMAT_VERSION,
    HEADER_BYTES,
    ValueFormat,
    encode_key,
    fingerprint,
)
from kvactors.media.remote_nodes import (
    Node,
    RemoteNodes,
    check_credentials,
    check_url,
    masked_url,
    parse_node,
)
from kvactors.media.remote_wire import ABSENT, READ_PIPELINE_BYTES, REFUSED, RemoteIO

__all__ = [
    "FORMAT_VERSION",
    "HEADER_BYTES",
    "RemoteCounters",
    "RemoteStore",
    "check_credentials",
    "check_url",
    "encode_key",
    "fingerprint",
    "masked_url",
    "parse_node",
]


class RemoteCounters(msgspec.Struct, frozen=True):
    """What a :class:`RemoteStore` saw since it opened.

    ``misses`` counts absent values (never stored or evicted by the server),
    ``corrupt`` values present but refused (truncated, garbage, foreign),
    ``node_failures`` calls to a node that failed or was skipped while down.
    """

    hits: int
    misses: int
    corrupt: int
    lookups: int
    stored: int
    bytes_read: int
    bytes_written: int
    read_seconds: float
    write_seconds: float
    node_failures: int
    down: list[str]


class RemoteStore:
    """Blocks of ``block_bytes`` in a Valkey / Redis server (``url``) or cluster
    (``nodes``, or ``url`` with ``cluster=True``); see the module docstring.

    ``username`` / ``password`` authenticate every connection, to the server or
    to each node (a ``url`` may carry them instead, not both: ConfigError); a URL's
    password is shown masked (``***``) wherever the store names the server.

    ``num_blocks`` is nominal (the server decides what it keeps); slot ids in
    the :class:`~kvactors.media.base.BlockMedium` calls are ignored and
    ``keys`` name the blocks. ``max_batch_bytes`` bounds the values one
    pipeline carries, so a large request never buffers unbounded replies.
    """

    in_memory = False
    durable = True  # the server outlives the process (not a crash of the server)
    writes_any_buffer = True
    """Writes take any host buffer (no alignment, no lifetime past the call), so a
    store's write-through may send the request's own rows (see the executor)."""
    ready_reads = True
    """``read_slots`` takes ``ready``, told each block as it arrives verified, so a
    promotion's load copies blocks out while the next arrive (see the tier actor)."""

    def __init__(
        self,
        name: str,
        block_bytes: int,
        *,
        url: str | None = None,
        nodes: Sequence[str] = (),
        cluster: bool = False,
        username: str | None = None,
        password: str | None = None,
        namespace: str = "kvactors",
        model: str = "",
        layout: str = "",
        connect_timeout: float = 0.5,
        timeout: float = 2.0,
        retry_after: float = 1.0,
        max_batch_bytes: int = 64 * 2**20,
        ttl: float | None = None,
        num_blocks: int = MAX_BLOCKS,
    ) -> None:
        try:
            import redis
            import redis.cluster
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise ConfigError(
                "remote: the remote tier needs the 'remote' extra: pip install 'kvactors[remote]'"
            ) from None
        fmt = ValueFormat(namespace, block_bytes, model, layout)
        if url is None and not nodes:
            raise ConfigError("remote: give a url or a list of cluster nodes")
        check_credentials(url, nodes, username, password)
        if url is not None and not nodes:
            check_url(url, cluster)
        self.name = name
        self.block_bytes = block_bytes
        self.num_blocks = num_blocks
        self._closed = False
        self.namespace = namespace
        self.format = fmt
        self.fingerprint = fmt.fingerprint
        self.prefix = fmt.prefix
        self.timeout = timeout
        self.retry_after = retry_after
        self.max_batch_bytes = max_batch_bytes
        self.ttl_ms = None if ttl is None else max(1, int(ttl * 1000))
        errors: tuple[type[BaseException], ...] = (
            redis.ConnectionError,
            redis.TimeoutError,
            redis.exceptions.ClusterError,
            # Something that is not a Valkey / Redis server answered (a wrong port):
            # down like a server that refuses the connection.
            redis.exceptions.InvalidResponse,
            # The server's ACL denies the user a command or a key (``NOPERM``):
            # down, with the server's reason, rather than every block a miss.
            # (A wrong password is an AuthenticationError, a ConnectionError.)
            redis.exceptions.NoPermissionError,
            OSError,
        )
        denied: dict[bytes, type[BaseException]] = {
            b"-NOPERM": redis.exceptions.NoPermissionError,
            b"-NOAUTH": redis.AuthenticationError,
        }
        single = not nodes and not cluster
        if single:
            # A redirect (MOVED / ASK; MovedError is an AskError) from a server
            # named as one: it is a node of a cluster and would serve only its
            # own slots' keys. Down, saying so, rather than misses and lost writes.
            errors += (redis.exceptions.AskError,)
            denied |= {b"-MOVED": redis.exceptions.MovedError, b"-ASK": redis.exceptions.AskError}
        self.io = RemoteIO(
            fmt, errors, (TimeoutError, redis.TimeoutError), redis.ResponseError, denied
        )
        """The commands on a connection (:mod:`~kvactors.media.remote_wire`)."""
        common: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": connect_timeout,
            # One quick retry: a pooled connection the server closed (say, it
            # restarted) fails once and is replaced; a dead server is not
            # hammered, it waits ``retry_after``.
            "retry": Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        }
        # Sent by every connection (HELLO ... AUTH, or AUTH) before its first command.
        if username is not None:
            common["username"] = username
        if password is not None:
            common["password"] = password
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(
            ("hits", "misses", "corrupt", "lookups", "stored", "bytes_read", "bytes_written"), 0
        )
        self._seconds = {"read": 0.0, "write": 0.0}
        self.nodes = RemoteNodes(
            name,
            url=url,
            nodes=nodes,
            cluster=cluster,
            options=common,
            retry_after=retry_after,
            errors=errors,
            lock=self._lock,
        )
        """The server or cluster nodes (:mod:`~kvactors.media.remote_nodes`)."""
        self.where = self.nodes.where

    # -- keys and values ------------------------------------------------------------

    def redis_key(self, key: Key) -> bytes:
        """The server key of block ``key``."""
        return self.format.redis_key(key)

    def header(self, key: Key, payload: memoryview) -> bytes:
        """The header of a value holding ``payload`` as block ``key``."""
        return self.format.header(key, payload)

    def _each(self, command: Callable[[int], Any]) -> Callable[[Node, list[int]], list[Any]]:
        """An executor for :meth:`_run` sending ``command(pos)`` for each position."""
        return lambda node, batch: self.io.execute(node, [command(pos) for pos in batch])

    def _run(
        self,
        rkeys: list[bytes],
        execute: Callable[[Node, list[int]], list[Any]],
        result: Callable[[int, Any], None],
        what: str,
        step: int = 0,
    ) -> list[int]:
        """:meth:`RemoteNodes.run <kvactors.media.remote_nodes.RemoteNodes.run>`, by
        default in batches of as many values as fit in ``max_batch_bytes``; after
        :meth:`close`, ActorClosed."""
        if self._closed:
            raise ActorClosed(f"remote {self.name!r}: {what} after the store was closed")
        step = step or max(1, self.max_batch_bytes // (self.block_bytes + HEADER_BYTES))
        return self.nodes.run(rkeys, execute, result, what, step)

    # -- block calls ----------------------------------------------------------------

    def contains(self, keys: Sequence[Key]) -> list[bool]:
        """Whether each block is present on the server (its bytes are checked on read).

        Keys whose node is down are ``False``; raises RemoteUnavailable when
        every node is.
        """
        rkeys = [self.redis_key(k) for k in keys]
        found = [False] * len(rkeys)

        def result(pos: int, n: Any) -> None:
            found[pos] = n == 1

        # EXISTS replies are small: one pipeline for up to 1024 keys.
        self._run(rkeys, self._each(lambda pos: ("EXISTS", rkeys[pos])), result, "lookup", 1024)
        with self._lock:
            self._counts["lookups"] += len(rkeys)
        return found

    def get_into(self, keys: Sequence[Key], bufs: Sequence[memoryview]) -> list[int]:
        """Read block ``keys[i]`` into ``bufs[i]`` (``block_bytes`` each); return the
        positions that missed (absent, refused, or on a node that is down).
        Nothing is written into a buffer whose value did not verify."""
        absent, refused = self.fetch(keys, bufs)
        return sorted(absent + refused)

    def fetch(
        self,
        keys: Sequence[Key],
        bufs: Sequence[memoryview],
        *,
        in_place: bool = False,
        ready: Callable[[int], None] | None = None,
    ) -> tuple[list[int], list[int]]:
        """Read block ``keys[i]`` into ``bufs[i]``; return the positions ``absent``
        (never stored, evicted, expired, or on a node that is down) and those
        ``refused`` (present but truncated, garbage, foreign or another block's).

        The ``GET``\\ s of a batch go out in one pipeline, at most
        :func:`~kvactors.media.remote_wire.read_window` values asked
        for and not yet read (the next ``GET`` goes out as a reply is read);
        each reply is read off the socket straight into a staging buffer of
        this thread, checked, and only then copied into ``bufs[i]``, before the
        call returns. With
        ``in_place`` it is read straight into ``bufs[i]`` and checked there:
        the buffers of the positions returned then hold undefined bytes (for
        buffers nobody reads before this call returned, see :meth:`read_slots`).
        ``ready(i)``, when given, is called in this thread as soon as
        ``bufs[i]`` holds block ``keys[i]``, verified (with the reads of the
        next values still going on): a position passed to it is delivered.
        """
        t0 = time.perf_counter()
        rkeys = [self.redis_key(k) for k in keys]
        status = [ABSENT] * len(rkeys)

        def execute(node: Node, batch: list[int]) -> list[Any]:
            return self.io.get_batch(node, batch, rkeys, keys, bufs, in_place, ready)

        def result(pos: int, got: Any) -> None:
            status[pos] = got

        step = max(1, READ_PIPELINE_BYTES // (self.block_bytes + HEADER_BYTES))
        self._run(rkeys, execute, result, "read", step)
        absent = [i for i, st in enumerate(status) if st == ABSENT]
        refused = [i for i, st in enumerate(status) if st == REFUSED]
        hits = len(rkeys) - len(absent) - len(refused)
        with self._lock:
            c = self._counts
            c["hits"] += hits
            c["misses"] += len(absent)
            c["corrupt"] += len(refused)
            c["bytes_read"] += hits * self.block_bytes
            self._seconds["read"] += time.perf_counter() - t0
        return absent, refused

    def put(self, keys: Sequence[Key], bufs: Sequence[memoryview]) -> list[int]:
        """Write block ``keys[i]`` from ``bufs[i]``; return the positions not written
        (the server refused them, e.g. out of memory under ``noeviction``, or
        their node is down). Raises RemoteUnavailable when no node took any."""
        t0 = time.perf_counter()
        rkeys = [self.redis_key(k) for k in keys]
        refused: list[int] = []

        def execute(node: Node, batch: list[int]) -> list[Any]:
            # SET key header+payload [PX ttl], framed by hand so that the payload
            # is sent from its buffer, never copied.
            return self.io.set_batch(node, batch, rkeys, keys, bufs, self.ttl_ms)

        def result(pos: int, ok: Any) -> None:
            if ok not in (b"OK", "OK", True):
                refused.append(pos)

        down = self._run(rkeys, execute, result, "write")
        bad = sorted(set(refused) | set(down))
        with self._lock:
            self._counts["stored"] += len(rkeys) - len(bad)
            self._counts["bytes_written"] += (len(rkeys) - len(bad)) * self.block_bytes
            self._seconds["write"] += time.perf_counter() - t0
        return bad

    def delete(self, keys: Sequence[Key]) -> None:
        """Remove blocks ``keys`` from the server (values that failed verification)."""
        rkeys = [self.redis_key(k) for k in keys]
        self._run(rkeys, self._each(lambda pos: ("DEL", rkeys[pos])), lambda pos, n: None, "delete")

    # -- the BlockMedium protocol -----------------------------------------------------

    def tensor(self) -> None:
        """No tensor: a buffer medium."""
        return None

    def read_buffers(
        self, ids: list[int], bufs: list[memoryview], keys: list[Key] | None = None
    ) -> list[int]:
        """Read blocks ``keys`` into ``bufs`` (``ids`` are ignored: the server names
        blocks by key). Blocks not delivered raise
        :class:`~kvactors.errors.BlocksMissingError` naming them (``missing``: those
        the server does not have; the rest were refused as damaged), once every
        block that arrived is in its buffer; so the result is always ``[]``. The
        buffer of a block not delivered is not touched."""
        return self._read(ids, bufs, keys, False)

    def read_slots(
        self,
        ids: list[int],
        bufs: list[memoryview],
        keys: list[Key] | None = None,
        ready: Callable[[int], None] | None = None,
    ) -> list[int]:
        """:meth:`read_buffers` into buffers nobody reads until this call returned
        (slots of the reader's own, such as the CPU slots a promotion fills): each
        value lands there straight off the socket and is verified in place, with
        no staging copy; the buffer of a block not delivered holds undefined
        bytes, and the error names it as for :meth:`read_buffers`. ``ready(i)``
        is called as soon as ``bufs[i]`` holds its block, verified (see
        :meth:`fetch`), so the caller may copy it out while the next arrive."""
        return self._read(ids, bufs, keys, True, ready)

    def _read(
        self,
        ids: list[int],
        bufs: list[memoryview],
        keys: list[Key] | None,
        in_place: bool,
        ready: Callable[[int], None] | None = None,
    ) -> list[int]:
        del ids
        if keys is None:
            raise ConfigError("remote: reads name blocks by key")
        absent, refused = self.fetch(keys, bufs, in_place=in_place, ready=ready)
        if absent or refused:
            gone = [keys[i] for i in absent]
            raise BlocksMissingError(
                f"remote {self.name!r}: {len(absent)} block(s) not on the server, "
                f"{len(refused)} damaged: {[keys[i] for i in (absent + refused)[:8]]!r}",
                [keys[i] for i in sorted(absent + refused)],
                gone,
            )
        return []

    def write_buffers(
        self, ids: list[int], bufs: list[memoryview], keys: list[Key] | None = None
    ) -> None:
        """Write ``bufs`` as blocks ``keys`` (``ids`` are ignored). A block the server
        refused (``noeviction`` and full) raises TransferError naming how many."""
        del ids
        if keys is None:
            raise ConfigError("remote: writes name blocks by key")
        refused = self.put(keys, bufs)
        if refused:
            raise TransferError(
                f"remote {self.name!r}: the server refused {len(refused)} of {len(keys)} blocks"
            )

    def recovered(self) -> list[Any]:
        """Nothing to recover: what the server holds is found by :meth:`contains`."""
        return []

    def read_into(
        self, ids: list[int], rows: torch.Tensor, keys: list[Key] | None = None
    ) -> list[int]:
        """Fill ``(n, block_bytes)`` ``rows`` with blocks ``keys`` (``ids`` are
        ignored); return the positions that missed."""
        del ids
        if keys is None:
            raise ConfigError("remote: reads name blocks by key")
        host = rows if rows.device.type == "cpu" else torch.empty_like(rows, device="cpu")
        missed = self.get_into(keys, row_buffers(host, range(host.shape[0])))
        if host is not rows:
            rows.copy_(host)
        return missed

    def write_from(self, ids: list[int], rows: torch.Tensor, keys: list[Key] | None = None) -> None:
        """Write ``(n, block_bytes)`` ``rows`` as blocks ``keys`` (``ids`` are
        ignored). Refused blocks are simply not stored: the remote is a cache."""
        del ids
        if keys is None:
            raise ConfigError("remote: writes name blocks by key")
        host = rows.cpu().contiguous()
        self.put(keys, row_buffers(host, range(host.shape[0])))

    def drop(self, keys: list[Key]) -> None:
        """Delete blocks ``keys`` from the server: the cache calls this for values
        that failed verification and for writes that did not complete. (Blocks
        it merely stops tracking stay on the server for other engines.) A server
        that is down is left alone."""
        with contextlib.suppress(RemoteUnavailable):
            self.delete(keys)

    # -- state ----------------------------------------------------------------------

    def ping(self) -> bool:
        """Whether every known node answers now (marks them up or down)."""
        return self.nodes.ping(self.prefix)

    @property
    def down(self) -> list[str]:
        """Nodes currently left alone after a failure."""
        return self.nodes.down

    def counters(self) -> RemoteCounters:
        with self._lock:
            c = dict(self._counts)
            seconds = dict(self._seconds)
            failures = self.nodes.failures
        return RemoteCounters(
            hits=c["hits"],
            misses=c["misses"],
            corrupt=c["corrupt"],
            lookups=c["lookups"],
            stored=c["stored"],
            bytes_read=c["bytes_read"],
            bytes_written=c["bytes_written"],
            read_seconds=seconds["read"],
            write_seconds=seconds["write"],
            node_failures=failures,
            down=self.down,
        )

    def close(self) -> None:
        """Close the connections; later server calls raise ActorClosed."""
        self._closed = True
        self.nodes.close()
