"""The remote store's commands on a connection: writes framed by hand, reads off the socket.

A write's payload goes to the socket from the caller's buffer as it is
(redis-py's own packer would copy it into one string first), and the
``SET``\\ s of a batch go out as they are framed, about :data:`SEND_BYTES` of
values per gathered write (:meth:`RemoteIO.set_batch`), so the server stores
the first values while the next are checksummed.
A read's reply is read off the socket by :class:`Wire` straight into a
staging buffer of the worker thread, checked, and only then copied into the
caller's buffer; reads ``in_place`` land in the destination itself and are
checked there (:meth:`RemoteIO.read_value`). The ``GET``\\ s of a batch go
out as the replies before them are read, at most :func:`read_window` values
ahead, so the server streams each value as it is asked for.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from kvactors.keys import Key
from kvactors.media.remote_format import HEADER_BYTES, ValueFormat, encode_key
from kvactors.media.remote_nodes import Node

__all__ = [
    "ABSENT",
    "HIT",
    "READ_PIPELINE_BYTES",
    "READ_WINDOW_BYTES",
    "READ_WINDOW_MAX_BYTES",
    "READ_WINDOW_VALUES",
    "REFUSED",
    "SEND_BYTES",
    "Local",
    "RemoteIO",
    "Wire",
    "read_window",
    "refills",
    "send_all",
]

READ_PIPELINE_BYTES = 16 * 2**20
"""Values one pipeline of ``GET``\\ s asks for at most (each reply is read off the
socket into its destination, or a staging buffer of one value; what the server
holds queued for the connection is bounded by :data:`READ_WINDOW_BYTES`)."""

READ_WINDOW_BYTES = 1 * 2**20
"""Values a connection has asked for and not yet read, at most (at least one):
the ``GET``\\ s of a pipeline go out as the replies before them are read, so
the server streams each value as it is asked for instead of queueing the
replies of the whole pipeline (which read slower here, from 512 KiB values up).
Small values get a deeper window (:func:`read_window`)."""

READ_WINDOW_VALUES = 64
"""Values a connection may have asked for and not yet read, at least, where
that many hold at most :data:`READ_WINDOW_MAX_BYTES` (blocks up to 64 KiB)."""

READ_WINDOW_MAX_BYTES = 4 * 2**20
"""See :data:`READ_WINDOW_VALUES`."""


def read_window(block_bytes: int) -> int:
    r"""How many ``GET``\ s a connection has out, not yet read, at most: what
    :data:`READ_WINDOW_BYTES` of values hold (at least one), or
    :data:`READ_WINDOW_VALUES` where that is more and they hold at most
    :data:`READ_WINDOW_MAX_BYTES` (at 64 KiB, 64 values: 4 MiB, against 15 in
    1 MiB, which left the server waiting on a busy client's next ``GET``)."""
    window = max(1, READ_WINDOW_BYTES // (block_bytes + HEADER_BYTES))
    if READ_WINDOW_VALUES * block_bytes <= READ_WINDOW_MAX_BYTES:
        window = max(window, READ_WINDOW_VALUES)
    return window


def refills(n: int, window: int) -> dict[int, tuple[int, int]]:
    r"""When the ``GET``\ s of an ``n``-value pipeline go out: the first ``window``
    at once, then ``{j: (start, end)}``: requests ``start:end`` just before reply
    ``j`` is read. A quarter of the window goes out in one write (at least one
    request, as from 512 KiB values up, where one is asked for as each reply is
    read), once so many replies were read: at most ``window + 1`` requests are
    then out unread, at least three quarters of the window while any are left to
    send, in a quarter of the system calls (64 KiB values: 16 a write)."""
    step = max(1, window // 4)
    out: dict[int, tuple[int, int]] = {}
    asked = min(window, n)
    j = asked + step - window - 1  # the first j with asked - j <= window + 1 - step
    while asked < n:
        j = max(j, 0)
        more = min(n, asked + step)
        out[j] = (asked, more)
        asked = more
        j += step
    return out


SEND_BYTES = 1 * 2**20
"""Values the ``SET``\\ s of a batch gather into one write to the socket, about
(one ``sendmsg`` of their frames and payloads; a value larger goes alone): the
first go out while the next are still being checksummed, in few system calls."""

SEND_BUFFERS = 512
"""Buffers one gathered write carries at most (Linux takes up to 1024)."""

HIT, ABSENT, REFUSED = 0, 1, 2  # what one GET delivered

T = TypeVar("T")


def send_all(sock: Any, chunks: list[Any]) -> None:
    """Write every byte of ``chunks`` to ``sock`` in order: gathered writes
    (``sendmsg``) resumed where a partial one stopped; one ``sendall`` per chunk
    on a socket without them (TLS)."""
    if isinstance(sock, ssl.SSLSocket):
        for chunk in chunks:
            sock.sendall(chunk)
        return
    while chunks:
        sent = sock.sendmsg(chunks)
        done = 0
        for chunk in chunks:
            size = len(chunk)
            if sent < size:
                break
            sent -= size
            done += 1
        if done == len(chunks):
            return
        chunks = chunks[done:]
        chunks[0] = memoryview(chunks[0])[sent:]


class Wire:
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


class Local(threading.local):
    """Per worker thread: a socket reader and a staging buffer for one value."""

    def __init__(self) -> None:
        self.wire = Wire()
        self.stage: memoryview | None = None


class RemoteIO:
    """The commands of a store of ``fmt``'s blocks on a node's pooled connections.

    ``errors`` are the connection errors and time-outs of the client (a node
    that raises one is failed), ``timeouts`` the time-outs among them,
    ``response_error`` a command's own error reply (``OOM``, ``MOVED``), and
    ``denied`` the error replies (by their first word, ``-NOPERM``) that fail the
    node instead: the server will not serve this user, so no reply would differ.
    """

    def __init__(
        self,
        fmt: ValueFormat,
        errors: tuple[type[BaseException], ...],
        timeouts: tuple[type[BaseException], ...],
        response_error: type[BaseException],
        denied: dict[bytes, type[BaseException]] | None = None,
    ) -> None:
        self.fmt = fmt
        self.denied = dict(denied or {})
        self.errors = errors
        self.timeouts = timeouts
        self.response_error = response_error
        self.local = Local()

    def execute(self, node: Node, commands: list[Any]) -> list[Any]:
        """Send ``commands`` to ``node``: one plain call for one, else one pipeline.
        A command's own error (``OOM``, ``MOVED``) is its result; a connection
        error or time-out raises."""
        if len(commands) == 1:
            try:
                return [node.client.execute_command(*commands[0])]
            except self.response_error as exc:
                return [exc]
        pipe = node.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        results: list[Any] = pipe.execute(raise_on_error=False)
        return results

    def set_batch(
        self,
        node: Node,
        batch: list[int],
        rkeys: list[bytes],
        keys: Sequence[Key],
        bufs: Sequence[memoryview],
        ttl_ms: int | None,
    ) -> list[Any]:
        """``SET`` server key ``rkeys[p]`` to block ``keys[p]``'s header and
        ``bufs[p]`` (with ``PX ttl_ms`` when given) for each position ``p`` of
        ``batch``, on one pooled connection; the replies in order (a command's own
        error, ``OOM``, as it is). Each command is framed by hand and its payload
        sent from its buffer as it is; they go out as they are framed, about
        :data:`SEND_BYTES` of values per gathered write (:func:`send_all`), so the
        server stores the first while the next are checksummed. A connection the
        server closed (say, it restarted) is replaced once; a time-out raises."""

        def sets(conn: Any) -> list[Any]:
            self._send_sets(conn._sock, batch, rkeys, keys, bufs, ttl_ms)
            replies: list[Any] = []
            for _ in batch:
                try:
                    replies.append(conn.read_response())
                except self.response_error as exc:
                    replies.append(exc)
            return replies

        # Writes go again on a new connection (a SET sent twice stores the same
        # value), but never after a time-out: a hung server is not waited on twice.
        return self._on_connection(node, sets, lambda exc: not isinstance(exc, self.timeouts))

    def _on_connection(
        self, node: Node, work: Callable[[Any], T], again: Callable[[BaseException], bool]
    ) -> T:
        """``work(conn)`` on a pooled connection of ``node``. A connection error or
        time-out disconnects it (it may hold unread replies, so it is never
        reused) and, where ``again(exc)`` says so, runs ``work`` once more on a
        new one (a pooled connection the server closed: say, it restarted);
        else, and the second time, it raises. Any other exception disconnects
        it too and raises."""
        pool = node.client.connection_pool
        for attempt in (0, 1):
            conn = pool.get_connection()
            try:
                return work(conn)
            except self.errors as exc:
                conn.disconnect()
                if attempt or not again(exc):
                    raise
            except BaseException:
                conn.disconnect()  # replies may be left unread on it: never reuse it
                raise
            finally:
                pool.release(conn)
        raise AssertionError("unreachable")  # pragma: no cover

    def _send_sets(
        self,
        sock: Any,
        batch: list[int],
        rkeys: list[bytes],
        keys: Sequence[Key],
        bufs: Sequence[memoryview],
        ttl_ms: int | None,
    ) -> None:
        """Frame and send the ``SET``\\ s of :meth:`set_batch`."""
        if ttl_ms is None:
            argc, tail = 3, b"\r\n"
        else:
            ms = b"%d" % ttl_ms
            argc, tail = 5, b"\r\n$2\r\nPX\r\n$%d\r\n%s\r\n" % (len(ms), ms)
        header = self.fmt.header
        chunks: list[Any] = []
        gathered = 0
        end = b""  # the end of the command before (sent with the next one's start)
        for pos in batch:
            if gathered >= SEND_BYTES or len(chunks) >= SEND_BUFFERS:
                send_all(sock, chunks)
                chunks, gathered = [], 0
            payload, rkey = bufs[pos], rkeys[pos]
            head = header(keys[pos], payload)
            size = len(head) + len(payload)
            chunks.append(
                b"%s*%d\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s"
                % (end, argc, len(rkey), rkey, size, head)
            )
            chunks.append(payload)
            gathered += len(payload)
            end = tail
        chunks.append(end)
        send_all(sock, chunks)

    def get_batch(
        self,
        node: Node,
        batch: list[int],
        rkeys: list[bytes],
        keys: Sequence[Key],
        bufs: Sequence[memoryview],
        in_place: bool,
        ready: Callable[[int], None] | None = None,
    ) -> list[int]:
        """``GET`` the keys of ``batch`` from ``node`` in one pipeline; what each
        delivered (:data:`HIT`, :data:`ABSENT`, :data:`REFUSED`). ``ready(pos)`` is
        called as soon as position ``pos`` is in ``bufs[pos]``, verified, while
        the next values are still on their way. A pooled connection the server
        closed (say, it restarted) is replaced once, before any value arrived."""
        requests = [b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(rkeys[p]), rkeys[p]) for p in batch]
        window = read_window(self.fmt.block_bytes)
        more = refills(len(requests), window)
        wire = self.local.wire
        got: list[int] = []

        def gets(conn: Any) -> list[int]:
            got.clear()
            try:
                conn.send_packed_command([b"".join(requests[:window])], check_health=False)
                sock = conn._sock
                wire.start(sock)
                for j, pos in enumerate(batch):
                    if j in more:
                        # More asked for as replies are read: the server works on
                        # the next values meanwhile, and never queues the batch.
                        start, end = more[j]
                        sock.sendall(b"".join(requests[start:end]))
                    status = self.read_value(wire, keys[pos], bufs[pos], in_place)
                    got.append(status)
                    if status == HIT and ready is not None:
                        ready(pos)
                if not wire.idle:
                    raise ConnectionError("protocol error: more replies than commands")
                return got
            finally:
                wire.sock = None

        # Read again only before any value arrived, and never after a time-out
        # (a hung server is not waited on twice).
        denied = tuple(self.denied.values())
        return self._on_connection(
            node,
            gets,
            lambda exc: not got and not isinstance(exc, self.timeouts + denied),
        )

    def read_value(self, wire: Wire, key: Key, buf: memoryview, in_place: bool) -> int:
        """Read one ``GET`` reply; its payload into ``buf`` if it is block ``key``'s,
        whole (with ``in_place`` straight into ``buf``, whatever it turns out to be)."""
        line = wire.line()
        kind = line[:1]
        if kind == b"$":
            size = int(line[1:])
            if size < 0:
                return ABSENT
            fmt = self.fmt
            raw = encode_key(key)
            start = HEADER_BYTES + len(raw)
            if size != start + fmt.block_bytes:
                wire.skip(size + 2)
                return REFUSED
            head = bytearray(start)
            wire.into(memoryview(head))
            digest = fmt.digest(head, raw)
            if digest is None:
                wire.skip(fmt.block_bytes + 2)  # not this block's: its bytes go nowhere
                return REFUSED
            stage = buf if in_place else self.stage()
            wire.into(stage)
            if wire.line():
                raise ConnectionError("protocol error: a value longer than announced")
            if fmt.hash(stage) != digest:
                return REFUSED
            if not in_place:
                buf[:] = stage  # verified: only now touch the caller's buffer
            return HIT
        if kind == b"-":
            code, _, text = line.partition(b" ")
            denied = self.denied.get(code)
            if denied is not None:  # NOPERM (the ACL), NOAUTH: not this key's fault
                # The text after the code, as redis-py's own parser gives it.
                raise denied(text.decode(errors="replace"))
            # MOVED / ASK: the slot moved (the map is reloaded on the next failure);
            # WRONGTYPE and the like: something else lives under this key.
            return ABSENT if line.startswith((b"-MOVED", b"-ASK")) else REFUSED
        if kind == b"_":  # RESP3's null
            return ABSENT
        raise ConnectionError(f"protocol error: unexpected reply {line[:32]!r}")

    def stage(self) -> memoryview:
        """This thread's staging buffer of one value."""
        stage = self.local.stage
        if stage is None or len(stage) != self.fmt.block_bytes:
            stage = self.local.stage = memoryview(bytearray(self.fmt.block_bytes))
        return stage
