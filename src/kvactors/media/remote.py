"""The remote medium: :class:`RemoteStore`, blocks in a Valkey / Redis server or cluster.

One key per block, ``{namespace}:{fingerprint}:{key hex}``, where the
fingerprint hashes everything that makes bytes compatible (``block_bytes``,
the layout and model identity the user supplies, and :data:`FORMAT_VERSION`),
so engines running different models never see each other's blocks. Each
value is a small header and the block's bytes::

    magic "KVR1" | fingerprint (8) | key length u16 | payload length u64 |
    xxh3-64 of the payload u64 | key | payload

A value that is absent (never stored, or evicted by the server), truncated,
garbage, or written under another fingerprint or key is a *miss*, counted and
reported, never bytes handed to the caller.

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
left alone for ``retry_after`` seconds (calls fail at once, without touching
the network); the first call after that tries it again, so the store
reconnects by itself once the server is back. In a cluster the nodes are
judged one by one: keys whose node is down are misses while another node
answers; only when every node is down does a call raise.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import msgspec
import torch

from kvactors.errors import BlocksMissingError, ConfigError, RemoteUnavailable, TransferError
from kvactors.keys import Key

__all__ = [
    "FORMAT_VERSION",
    "RemoteCounters",
    "RemoteStore",
    "fingerprint",
    "parse_node",
]

FORMAT_VERSION = 1
"""Version of the value format; part of the fingerprint, so a change starts a new namespace."""

MAGIC = b"KVR1"
_HEAD = struct.Struct("<4s8sHQQ")  # magic, fingerprint, key length, payload length, xxh3
HEADER_BYTES = _HEAD.size
READ_PIPELINE_BYTES = 16 * 2**20
"""Values one pipeline of ``GET``\\ s asks for at most (each reply is read off the
socket into its destination, or a staging buffer of one value; what the server
holds queued for the connection is bounded by :data:`READ_WINDOW_BYTES`)."""

READ_WINDOW_BYTES = 1 * 2**20
"""Values a connection has asked for and not yet read, at most (at least one):
the ``GET``\\ s of a pipeline go out as the replies before them are read, so
the server streams each value as it is asked for instead of queueing the
replies of the whole pipeline (which read slower here, from 512 KiB values up)."""

T = TypeVar("T")


def _xxh3() -> Callable[[Any], int]:
    try:
        import xxhash
    except ImportError:  # pragma: no cover - the remote extra installs it
        raise ConfigError(
            "remote: the remote tier needs the 'remote' extra: pip install 'kvactors[remote]'"
        ) from None
    fn: Callable[[Any], int] = xxhash.xxh3_64_intdigest
    return fn


def fingerprint(block_bytes: int, model: str = "", layout: str = "") -> bytes:
    """8 bytes naming what makes block bytes compatible between engines."""
    text = (
        f"kvactors-remote/{FORMAT_VERSION}|block_bytes={block_bytes}|layout={layout}|model={model}"
    )
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def encode_key(key: Key) -> bytes:
    """A key as bytes, the same in every process (``int`` and ``bytes`` keys never collide)."""
    if type(key) is bytes:
        return b"b" + key
    assert isinstance(key, int)
    return b"i" + key.to_bytes((key.bit_length() + 8) // 8, "little", signed=True)


def parse_node(text: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``; a bad one raises ConfigError."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"remote.nodes: expected 'host:port', got {text!r}")
    return host.strip("[]"), int(port)


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


class _Packed:
    """One command already in the wire format: its chunks, sent in order."""

    __slots__ = ("chunks",)

    def __init__(self, chunks: list[Any]) -> None:
        self.chunks = chunks


class _Node:
    """One server: its client and when it may be tried again after a failure."""

    __slots__ = ("client", "down_until", "error", "name")

    def __init__(self, name: str, client: Any) -> None:
        self.name = name
        self.client = client
        self.down_until = 0.0
        self.error = ""


_HIT, _ABSENT, _REFUSED = 0, 1, 2  # what one GET delivered


class _Wire:
    """RESP2 replies read straight off one connection's socket.

    Bulk replies land where the reader says (:meth:`into`), with ``recv_into``
    and no intermediate copy; only the short lines (``$len``, errors) and what
    arrived with them pass through the small ``buf``. The reader must end at a
    reply boundary (:attr:`idle`); a connection it leaves elsewhere is closed.
    """

    __slots__ = ("buf", "hi", "lo", "sock", "view")

    def __init__(self, size: int = 1 << 16) -> None:
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.sock: Any = None
        self.lo = self.hi = 0

    def start(self, sock: Any) -> None:
        self.sock = sock
        self.lo = self.hi = 0

    @property
    def idle(self) -> bool:
        return self.lo == self.hi

    def _fill(self) -> None:
        if self.lo == self.hi:
            self.lo = self.hi = 0
        elif self.hi == len(self.buf):
            n = self.hi - self.lo
            self.buf[:n] = self.buf[self.lo : self.hi]
            self.lo, self.hi = 0, n
        got = self.sock.recv_into(self.view[self.hi :])
        if not got:
            raise ConnectionError("the server closed the connection")
        self.hi += got

    def line(self) -> bytes:
        """One reply line, without its CRLF."""
        while True:
            end = self.buf.find(b"\r\n", self.lo, self.hi)
            if end >= 0:
                out = bytes(self.view[self.lo : end])
                self.lo = end + 2
                return out
            if self.lo == 0 and self.hi == len(self.buf):
                raise ConnectionError("protocol error: reply line too long")
            self._fill()

    def into(self, dst: memoryview) -> None:
        """Exactly ``len(dst)`` bytes of the stream into ``dst``."""
        want = len(dst)
        have = min(self.hi - self.lo, want)
        if have:
            dst[:have] = self.view[self.lo : self.lo + have]
            self.lo += have
        recv = self.sock.recv_into
        while have < want:
            got = recv(dst[have:])
            if not got:
                raise ConnectionError("the server closed the connection")
            have += got

    def skip(self, n: int) -> None:
        """Discard ``n`` bytes of the stream."""
        while n:
            if self.lo == self.hi:
                self._fill()
            take = min(n, self.hi - self.lo)
            self.lo += take
            n -= take


class _Local(threading.local):
    """Per worker thread: a socket reader and a staging buffer for one value."""

    def __init__(self) -> None:
        self.wire = _Wire()
        self.stage: memoryview | None = None


class RemoteStore:
    """Blocks of ``block_bytes`` in a Valkey / Redis server (``url``) or cluster
    (``nodes``, or ``url`` with ``cluster=True``); see the module docstring.

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

    def __init__(
        self,
        name: str,
        block_bytes: int,
        *,
        url: str | None = None,
        nodes: Sequence[str] = (),
        cluster: bool = False,
        namespace: str = "kvactors",
        model: str = "",
        layout: str = "",
        connect_timeout: float = 0.5,
        timeout: float = 2.0,
        retry_after: float = 1.0,
        max_batch_bytes: int = 64 * 2**20,
        ttl: float | None = None,
        num_blocks: int = 2**31 - 1,
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
        if any(c in namespace for c in "{}: ") or not namespace:
            raise ConfigError(
                f"remote.namespace: expected a non-empty name without '{{', '}}', ':' "
                f"or spaces, got {namespace!r}"
            )
        if url is None and not nodes:
            raise ConfigError("remote: give a url or a list of cluster nodes")
        self.name = name
        self.block_bytes = block_bytes
        self.num_blocks = num_blocks
        self.namespace = namespace
        self.fingerprint = fingerprint(block_bytes, model, layout)
        self.prefix = f"{namespace}:{self.fingerprint.hex()}:".encode()
        self.timeout = timeout
        self.retry_after = retry_after
        self.max_batch_bytes = max_batch_bytes
        self.ttl_ms = None if ttl is None else max(1, int(ttl * 1000))
        self._hash = _xxh3()
        self._errors: tuple[type[BaseException], ...] = (
            redis.ConnectionError,
            redis.TimeoutError,
            redis.exceptions.ClusterError,
            OSError,
        )
        self._timeouts: tuple[type[BaseException], ...] = (TimeoutError, redis.TimeoutError)
        self._response_error = redis.ResponseError
        self._local = _Local()
        common: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": connect_timeout,
            # One quick retry: a pooled connection the server closed (say, it
            # restarted) fails once and is replaced; a dead server is not
            # hammered, it waits ``retry_after``.
            "retry": Retry(NoBackoff(), 1),
        }
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(
            ("hits", "misses", "corrupt", "lookups", "stored", "bytes_read", "bytes_written"), 0
        )
        self._seconds = {"read": 0.0, "write": 0.0}
        self._node_failures = 0
        self._cluster: Any = None
        self._connect: Callable[[], Any] | None = None
        self._connect_lock = threading.Lock()
        self._entry = _Node("cluster", None)  # when the cluster's map cannot be had
        self._nodes: dict[str, _Node] = {}
        if nodes or cluster:
            startup = [
                redis.cluster.ClusterNode(*parse_node(n))  # type: ignore[no-untyped-call]
                for n in nodes
            ]
            kwargs = {"require_full_coverage": False, **common}
            if startup:
                self._connect = lambda: redis.cluster.RedisCluster(startup_nodes=startup, **kwargs)
            else:
                assert url is not None
                self._connect = lambda: redis.cluster.RedisCluster.from_url(url, **kwargs)
            self.where = ",".join(nodes) if nodes else str(url)
        else:
            assert url is not None
            try:
                client = redis.Redis.from_url(url, **common)
            except ValueError as exc:
                raise ConfigError(f"remote.url: {exc}") from None
            self._nodes["server"] = _Node(url, client)
            self.where = url

    # -- keys and values ------------------------------------------------------------

    def redis_key(self, key: Key) -> bytes:
        """The server key of block ``key``."""
        return self.prefix + encode_key(key).hex().encode()

    def header(self, key: Key, payload: memoryview) -> bytes:
        """The header of a value holding ``payload`` as block ``key``."""
        raw = encode_key(key)
        head = _HEAD.pack(MAGIC, self.fingerprint, len(raw), len(payload), self._hash(payload))
        return head + raw

    def _verify(self, key: Key, value: Any) -> memoryview | None:
        """The payload of ``value`` if it is block ``key``'s, whole; else ``None``."""
        raw = encode_key(key)
        if not isinstance(value, bytes) or len(value) < HEADER_BYTES:
            return None
        magic, fp, klen, plen, digest = _HEAD.unpack_from(value)
        start = HEADER_BYTES + klen
        if (
            magic != MAGIC
            or fp != self.fingerprint
            or klen != len(raw)
            or plen != self.block_bytes
            or len(value) != start + plen
            or value[HEADER_BYTES:start] != raw
        ):
            return None
        payload = memoryview(value)[start:]
        if self._hash(payload) != digest:
            return None
        return payload

    # -- nodes ----------------------------------------------------------------------

    def _groups(self, rkeys: list[bytes]) -> list[tuple[_Node, list[int]]]:
        """The positions of ``rkeys`` grouped by the node that serves them."""
        if self._connect is None:
            return [(self._nodes["server"], list(range(len(rkeys))))]
        cluster = self._cluster_client()
        groups: dict[str, list[int]] = {}
        for pos, rkey in enumerate(rkeys):
            node = cluster.nodes_manager.get_node_from_slot(cluster.keyslot(rkey))
            groups.setdefault(node.name, []).append(pos)
            if node.name not in self._nodes:
                self._nodes[node.name] = _Node(node.name, cluster.get_redis_connection(node))
        return [(self._nodes[name], positions) for name, positions in groups.items()]

    def _batches(self, positions: list[int], step: int) -> Iterator[list[int]]:
        for i in range(0, len(positions), step):
            yield positions[i : i + step]

    def _execute(self, node: _Node, commands: list[Any]) -> list[Any]:
        """Send ``commands`` to ``node``: one plain call for one, else one pipeline
        (:class:`_Packed` ones as they are). A command's own error (``OOM``,
        ``MOVED``) is its result; a connection error or time-out raises."""
        if isinstance(commands[0], _Packed):
            return self._send_packed(node, commands)
        if len(commands) == 1:
            try:
                return [node.client.execute_command(*commands[0])]
            except self._response_error as exc:
                return [exc]
        pipe = node.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        results: list[Any] = pipe.execute(raise_on_error=False)
        return results

    def _each(self, command: Callable[[int], Any]) -> Callable[[_Node, list[int]], list[Any]]:
        """An executor for :meth:`_run` sending ``command(pos)`` for each position."""
        return lambda node, batch: self._execute(node, [command(pos) for pos in batch])

    def _send_packed(self, node: _Node, commands: list[_Packed]) -> list[Any]:
        """Send pre-packed commands on one pooled connection and read their replies.

        The block's bytes go to the socket from the caller's buffer as they are
        (redis-py's own packer would copy them into one string first). A
        connection the server closed (say, it restarted) is replaced once.
        """
        pool = node.client.connection_pool
        chunks = [chunk for command in commands for chunk in command.chunks]
        for attempt in (0, 1):
            conn = pool.get_connection()
            try:
                conn.send_packed_command(chunks, check_health=False)
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(conn.read_response())
                    except self._response_error as exc:
                        replies.append(exc)
                return replies
            except self._errors:
                conn.disconnect()
                if attempt:
                    raise
            except BaseException:
                conn.disconnect()  # replies may be left unread on it: never reuse it
                raise
            finally:
                pool.release(conn)
        raise AssertionError("unreachable")  # pragma: no cover

    def _run(
        self,
        rkeys: list[bytes],
        execute: Callable[[_Node, list[int]], list[Any]],
        result: Callable[[int, Any], None],
        what: str,
        step: int = 0,
    ) -> list[int]:
        """Have ``execute(node, batch)`` run the commands of the positions of
        ``rkeys`` that ``node`` serves (see :meth:`_each`), in batches of ``step``
        commands (by default as many values as fit in ``max_batch_bytes``), and
        pass each reply to ``result(pos, reply)``. Returns the positions whose node
        failed or is down (their keys count as misses); raises RemoteUnavailable
        when the server failed, or in a cluster when every node is down."""
        step = step or max(1, self.max_batch_bytes // (self.block_bytes + HEADER_BYTES))
        failed: list[int] = []
        errors: list[str] = []
        now = time.monotonic()
        for node, positions in self._groups(rkeys):
            if node.down_until > now:
                failed += positions
                errors.append(f"{node.name}: {node.error} (retrying in {self.retry_after:g} s)")
                continue
            try:
                for batch in self._batches(positions, step):
                    replies = execute(node, batch)
                    for pos, reply in zip(batch, replies):
                        if isinstance(reply, self._errors):
                            raise reply
                        result(pos, reply)
            except self._errors as exc:
                node.down_until = time.monotonic() + self.retry_after
                node.error = f"{type(exc).__name__}: {exc}"
                errors.append(f"{node.name}: {node.error}")
                failed += positions
                if self._cluster is not None:
                    self._refresh()
            else:
                node.down_until = 0.0
        if failed:
            with self._lock:
                self._node_failures += len(errors)
            # In a cluster, keys on a dead node are misses while another node serves.
            now = time.monotonic()
            alive = self._connect is not None and any(
                n.down_until <= now for n in self._nodes.values()
            )
            if len(failed) == len(rkeys) and not alive:
                raise RemoteUnavailable(
                    f"remote {self.name!r}: {what} failed: " + "; ".join(errors[:4]),
                    self.retry_after,
                )
        return failed

    def _cluster_client(self) -> Any:
        """The cluster client, made on first use (it reads the cluster's slot map,
        so it needs a node that answers: until then the store is down)."""
        with self._connect_lock:
            return self._cluster or self._open_cluster()

    def _open_cluster(self) -> Any:
        entry = self._entry
        if entry.down_until > time.monotonic():
            raise RemoteUnavailable(
                f"remote {self.name!r}: {entry.error} (retrying in {self.retry_after:g} s)",
                self.retry_after,
            )
        assert self._connect is not None
        try:
            self._cluster = self._connect()
        except Exception as exc:  # RedisClusterException, ConnectionError, ...
            entry.down_until = time.monotonic() + self.retry_after
            entry.error = f"cannot reach the cluster {self.where}: {exc}"
            with self._lock:
                self._node_failures += 1
            raise RemoteUnavailable(
                f"remote {self.name!r}: {entry.error}", self.retry_after
            ) from exc
        entry.down_until = 0.0
        return self._cluster

    def _refresh(self) -> None:
        # The cluster's map of slots may have changed (a node failed over or
        # left): reload it; where no node answers the old map stays.
        with contextlib.suppress(Exception):  # RedisClusterException when no node answers
            self._cluster.nodes_manager.initialize()
        self._nodes = {n: v for n, v in self._nodes.items() if self._known(n)}

    def _known(self, name: str) -> bool:
        return self._cluster.get_node(node_name=name) is not None

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
        self, keys: Sequence[Key], bufs: Sequence[memoryview], *, in_place: bool = False
    ) -> tuple[list[int], list[int]]:
        """Read block ``keys[i]`` into ``bufs[i]``; return the positions ``absent``
        (never stored, evicted, expired, or on a node that is down) and those
        ``refused`` (present but truncated, garbage, foreign or another block's).

        The ``GET``\\ s of a batch go out in one pipeline, at most
        :data:`READ_WINDOW_BYTES` of values asked for and not yet read (the next
        ``GET`` goes out as a reply is read); each reply is read off
        the socket straight into a staging buffer of this thread, checked, and
        only then copied into ``bufs[i]``, before the call returns. With
        ``in_place`` it is read straight into ``bufs[i]`` and checked there:
        the buffers of the positions returned then hold undefined bytes (for
        buffers nobody reads before this call returned, see :meth:`read_slots`).
        """
        t0 = time.perf_counter()
        rkeys = [self.redis_key(k) for k in keys]
        status = [_ABSENT] * len(rkeys)

        def execute(node: _Node, batch: list[int]) -> list[Any]:
            return self._get_batch(node, batch, rkeys, keys, bufs, in_place)

        def result(pos: int, got: Any) -> None:
            status[pos] = got

        step = max(1, READ_PIPELINE_BYTES // (self.block_bytes + HEADER_BYTES))
        self._run(rkeys, execute, result, "read", step)
        absent = [i for i, st in enumerate(status) if st == _ABSENT]
        refused = [i for i, st in enumerate(status) if st == _REFUSED]
        hits = len(rkeys) - len(absent) - len(refused)
        with self._lock:
            c = self._counts
            c["hits"] += hits
            c["misses"] += len(absent)
            c["corrupt"] += len(refused)
            c["bytes_read"] += hits * self.block_bytes
            self._seconds["read"] += time.perf_counter() - t0
        return absent, refused

    def _get_batch(
        self,
        node: _Node,
        batch: list[int],
        rkeys: list[bytes],
        keys: Sequence[Key],
        bufs: Sequence[memoryview],
        in_place: bool,
    ) -> list[int]:
        """``GET`` the keys of ``batch`` from ``node`` in one pipeline; what each
        delivered (:data:`_HIT`, :data:`_ABSENT`, :data:`_REFUSED`). A pooled
        connection the server closed (say, it restarted) is replaced once."""
        requests = [b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(rkeys[p]), rkeys[p]) for p in batch]
        window = max(1, READ_WINDOW_BYTES // (self.block_bytes + HEADER_BYTES))
        pool = node.client.connection_pool
        wire = self._local.wire
        for attempt in (0, 1):
            conn = pool.get_connection()
            got: list[int] = []
            try:
                conn.send_packed_command([b"".join(requests[:window])], check_health=False)
                sock = conn._sock
                wire.start(sock)
                for j, pos in enumerate(batch):
                    if j + window < len(requests):
                        # One more asked for as one is read: the server works on
                        # the next value meanwhile, and never queues the batch.
                        sock.sendall(requests[j + window])
                    got.append(self._read_value(wire, keys[pos], bufs[pos], in_place))
                if not wire.idle:
                    raise ConnectionError("protocol error: more replies than commands")
                return got
            except self._errors as exc:
                conn.disconnect()
                if attempt or got or isinstance(exc, self._timeouts):
                    raise
            except BaseException:
                conn.disconnect()  # replies may be left unread on it: never reuse it
                raise
            finally:
                wire.sock = None
                pool.release(conn)
        raise AssertionError("unreachable")  # pragma: no cover

    def _read_value(self, wire: _Wire, key: Key, buf: memoryview, in_place: bool) -> int:
        """Read one ``GET`` reply; its payload into ``buf`` if it is block ``key``'s,
        whole (with ``in_place`` straight into ``buf``, whatever it turns out to be)."""
        line = wire.line()
        kind = line[:1]
        if kind == b"$":
            size = int(line[1:])
            if size < 0:
                return _ABSENT
            raw = encode_key(key)
            start = HEADER_BYTES + len(raw)
            if size != start + self.block_bytes:
                wire.skip(size + 2)
                return _REFUSED
            head = bytearray(start)
            wire.into(memoryview(head))
            magic, fp, klen, plen, digest = _HEAD.unpack_from(head)
            if (
                magic != MAGIC
                or fp != self.fingerprint
                or klen != len(raw)
                or plen != self.block_bytes
                or head[HEADER_BYTES:] != raw
            ):
                wire.skip(self.block_bytes + 2)  # not this block's: its bytes go nowhere
                return _REFUSED
            stage = buf if in_place else self._stage()
            wire.into(stage)
            if wire.line():
                raise ConnectionError("protocol error: a value longer than announced")
            if self._hash(stage) != digest:
                return _REFUSED
            if not in_place:
                buf[:] = stage  # verified: only now touch the caller's buffer
            return _HIT
        if kind == b"-":
            # MOVED / ASK: the slot moved (the map is reloaded on the next failure);
            # WRONGTYPE and the like: something else lives under this key.
            return _ABSENT if line.startswith((b"-MOVED", b"-ASK")) else _REFUSED
        if kind == b"_":  # RESP3's null
            return _ABSENT
        raise ConnectionError(f"protocol error: unexpected reply {line[:32]!r}")

    def _stage(self) -> memoryview:
        """This thread's staging buffer of one value."""
        stage = self._local.stage
        if stage is None or len(stage) != self.block_bytes:
            stage = self._local.stage = memoryview(bytearray(self.block_bytes))
        return stage

    def put(self, keys: Sequence[Key], bufs: Sequence[memoryview]) -> list[int]:
        """Write block ``keys[i]`` from ``bufs[i]``; return the positions not written
        (the server refused them, e.g. out of memory under ``noeviction``, or
        their node is down). Raises RemoteUnavailable when no node took any."""
        t0 = time.perf_counter()
        rkeys = [self.redis_key(k) for k in keys]
        refused: list[int] = []
        ttl = (
            b"\r\n"
            if self.ttl_ms is None
            else b"\r\n$2\r\nPX\r\n$%d\r\n%d\r\n"
            % (
                len(str(self.ttl_ms)),
                self.ttl_ms,
            )
        )
        argc = 3 if self.ttl_ms is None else 5

        def command(pos: int) -> _Packed:
            # SET key header+payload [PX ttl], framed by hand so that the payload
            # is sent from its buffer, never copied.
            payload, rkey = bufs[pos], rkeys[pos]
            head = self.header(keys[pos], payload)
            size = len(head) + len(payload)
            start = b"*%d\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (argc, len(rkey), rkey, size)
            return _Packed([start + head, payload, ttl])

        def result(pos: int, ok: Any) -> None:
            if ok not in (b"OK", "OK", True):
                refused.append(pos)

        down = self._run(rkeys, self._each(command), result, "write")
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
        self, ids: list[int], bufs: list[memoryview], keys: list[Key] | None = None
    ) -> list[int]:
        """:meth:`read_buffers` into buffers nobody reads until this call returned
        (slots of the reader's own, such as the CPU slots a promotion fills): each
        value lands there straight off the socket and is verified in place, with
        no staging copy; the buffer of a block not delivered holds undefined
        bytes, and the error names it as for :meth:`read_buffers`."""
        return self._read(ids, bufs, keys, True)

    def _read(
        self, ids: list[int], bufs: list[memoryview], keys: list[Key] | None, in_place: bool
    ) -> list[int]:
        del ids
        if keys is None:
            raise ConfigError("remote: reads name blocks by key")
        absent, refused = self.fetch(keys, bufs, in_place=in_place)
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
        missed = self.get_into(keys, _row_views(host))
        if host is not rows:
            rows.copy_(host)
        return missed

    def write_from(self, ids: list[int], rows: torch.Tensor, keys: list[Key] | None = None) -> None:
        """Write ``(n, block_bytes)`` ``rows`` as blocks ``keys`` (``ids`` are
        ignored). Refused blocks are simply not stored: the remote is a cache."""
        del ids
        if keys is None:
            raise ConfigError("remote: writes name blocks by key")
        self.put(keys, _row_views(rows.cpu().contiguous()))

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
        if self._connect is not None:
            try:
                self._groups([self.prefix])  # makes the client, learns a node
            except RemoteUnavailable:
                return False
        ok = True
        for node in list(self._nodes.values()):
            try:
                node.client.ping()
            except self._errors as exc:
                node.down_until = time.monotonic() + self.retry_after
                node.error = f"{type(exc).__name__}: {exc}"
                ok = False
            else:
                node.down_until = 0.0
        return ok

    @property
    def down(self) -> list[str]:
        """Nodes currently left alone after a failure."""
        now = time.monotonic()
        nodes = [*self._nodes.values(), self._entry]
        return sorted(n.name for n in nodes if n.down_until > now)

    def counters(self) -> RemoteCounters:
        with self._lock:
            c = dict(self._counts)
            seconds = dict(self._seconds)
            failures = self._node_failures
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
        if self._cluster is not None:
            self._cluster.close()
        for node in self._nodes.values():
            if self._cluster is None:
                node.client.close()
        self._nodes = {}


def _row_views(rows: torch.Tensor) -> list[memoryview]:
    flat = memoryview(rows.numpy()).cast("B")  # type: ignore[arg-type]
    bb = rows.shape[1]
    return [flat[i * bb : (i + 1) * bb] for i in range(rows.shape[0])]
