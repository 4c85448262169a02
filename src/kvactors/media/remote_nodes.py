"""The remote store's servers: which node serves a key, and which nodes are down.

A server that refuses connections or does not answer within the client's
time-out raises :class:`~kvactors.errors.RemoteUnavailable` and is then left
alone for ``retry_after`` seconds (calls fail at once, without touching the
network); the first call after that tries it again, so the store reconnects
by itself once the server is back. In a cluster the nodes are judged one by
one: keys whose node is down are misses while another node answers; only
when every node is down does a call raise.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from kvactors.config import REMOTE_SCHEMES
from kvactors.errors import ConfigError, RemoteUnavailable

__all__ = [
    "Node",
    "RemoteNodes",
    "check_credentials",
    "check_scheme",
    "check_url",
    "masked_url",
    "parse_node",
    "url_credentials",
]

_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*")


def _split(url: str) -> tuple[str, str, str]:
    """``url`` -> (``scheme://``, netloc, the rest), as ``urllib.parse`` cuts it."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", "", url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    return scheme + sep, rest[:end], rest[end:]


def masked_url(url: str) -> str:
    """``url`` with its password shown as ``***`` (the user name stays): in
    ``redis://user:pw@host`` and in a ``password=`` query argument, both of which
    redis-py reads. A URL without a password comes back as it is."""
    scheme, netloc, rest = _split(url)
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    return scheme + netloc + _QUERY_PASSWORD.sub(r"\1***", rest)


def url_credentials(url: str) -> tuple[str | None, str | None]:
    """The user name and password ``url`` carries (``None`` where it has none), as
    redis-py reads them: ``user:password@`` or ``username=`` / ``password=`` query
    arguments."""
    _, netloc, rest = _split(url)
    userinfo, at, _ = netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    query = parse_qs(rest.partition("?")[2].partition("#")[0])
    found = (
        unquote(user) if at and user else None,
        unquote(password) if at and colon and password else None,
    )
    username = query["username"][0] if query.get("username") else found[0]
    return username, query["password"][0] if query.get("password") else found[1]


def parse_node(text: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``; a bad one raises ConfigError."""
    host, sep, port = text.rpartition(":")
    if (
        not sep
        or not host
        or any(c.isspace() for c in host)
        or not (port.isascii() and port.isdigit())
        or not 0 < int(port) < 65536
    ):
        raise ConfigError(f"remote.nodes: expected 'host:port', got {text!r}")
    return host.strip("[]"), int(port)


def check_scheme(url: str) -> None:
    """ConfigError naming ``remote.url`` for a URL of no scheme the tier speaks
    (:data:`~kvactors.config.REMOTE_SCHEMES`); the password is shown as ``***``."""
    if not url.startswith(REMOTE_SCHEMES):
        raise ConfigError(
            f"remote.url: expected {', '.join(s + '...' for s in REMOTE_SCHEMES)}, "
            f"got {masked_url(url)!r}"
        )


def check_url(url: str, cluster: bool = False) -> None:
    """ConfigError naming ``remote.url`` where redis-py would not connect to ``url``
    as written: another scheme, a port that is no number 1..65535, a path that
    is no database number (``/0``; redis-py would take database 0 for
    ``/db0``), a ``unix://`` URL without a path, a query argument redis-py does
    not take or a value it cannot read (which would fail only at the first
    connection); with ``cluster``, a database other than 0 (a cluster has only
    that one) or a ``unix://`` URL (``remote.cluster``: nodes are reached over
    TCP). The password is shown as ``***``."""
    check_scheme(url)
    shown = masked_url(url)
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(
                f"remote.url: a unix:// URL names the socket's path "
                f"(unix:///run/valkey.sock), got {shown!r}"
            )
        if cluster:
            raise ConfigError(
                f"remote.cluster: a cluster's nodes are reached over TCP, "
                f"not a unix:// socket ({shown!r})"
            )
        path = ""
    else:
        try:
            port = parts.port
        except ValueError as exc:  # "Port out of range 0-65535", "... as 'abc'"
            raise ConfigError(f"remote.url: {exc} in {shown!r}") from None
        if port == 0:
            raise ConfigError(f"remote.url: expected a port 1..65535, got 0 in {shown!r}")
        path = unquote(parts.path).removeprefix("/")
    db = query["db"][0] if query.get("db") else path or "0"
    for text in (path or "0", db):
        if not (text.isascii() and text.isdigit()):
            raise ConfigError(
                f"remote.url: expected a database number (redis://host:6379/0), "
                f"got {text!r} in {shown!r}"
            )
    if cluster and int(db) != 0:
        raise ConfigError(f"remote.url: a cluster has database 0 only, got {db} in {shown!r}")
    try:
        import redis.connection
    except ImportError:  # the store says which extra it needs
        return
    try:
        options = redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:  # "Invalid value for 'db' in connection URL."
        raise ConfigError(f"remote.url: {exc} ({shown!r})") from None
    taken = _parameters(redis.ConnectionPool)
    for cls in options.get("connection_class", redis.connection.Connection).__mro__:
        taken |= _parameters(cls)
    for name in query:
        if name not in taken:
            raise ConfigError(f"remote.url: redis-py takes no query argument {name!r} ({shown!r})")


def _parameters(cls: type) -> set[str]:
    """The keyword parameters ``cls.__init__`` itself names."""
    init = cls.__dict__.get("__init__")
    if init is None:
        return set()
    return {
        p.name
        for p in inspect.signature(init).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def check_credentials(
    url: str | None,
    nodes: Sequence[str],
    username: object,
    password: object,
    names: tuple[str, str] = ("remote.username", "remote.password"),
) -> None:
    """ConfigError, naming the setting (``names``: the user name's, the
    password's), where ``username`` / ``password`` are given and are not
    non-empty strings, or the ``url`` that would be used (``nodes`` override it)
    carries one too. A password is never shown."""
    for name, value, secret in ((names[0], username, False), (names[1], password, True)):
        if value is not None and (not isinstance(value, str) or not value):
            shown = "***" if secret and isinstance(value, str) else repr(value)
            raise ConfigError(f"{name}: expected a non-empty string or none, got {shown}")
    if url is None or nodes:
        return
    in_url = url_credentials(url)
    for name, field, value, found in (
        (names[0], "username", username, in_url[0]),
        (names[1], "password", password, in_url[1]),
    ):
        if value is not None and found is not None:
            raise ConfigError(
                f"{name}: the url {masked_url(url)} carries a {field} too; give it in one place"
            )


def _set_up(conn: Any) -> None:
    """A new connection's set-up (``HELLO`` / ``AUTH``, ``SELECT``), as redis-py
    does it; an error reply to it (``SELECT`` of a database the server does not
    have) fails the connection: the server will not serve it, so the node is
    down with the server's reason, never each command's own error (a lookup
    answering "absent")."""
    import redis

    try:
        conn.on_connect()
    except redis.ResponseError as exc:
        if isinstance(exc, redis.exceptions.NoPermissionError):
            raise  # the ACL's refusal, down as it is
        raise redis.ConnectionError(f"the server refused the connection: {exc}") from exc


class Node:
    """One server: its client and when it may be tried again after a failure."""

    __slots__ = ("client", "down_until", "error", "name")

    def __init__(self, name: str, client: Any) -> None:
        self.name = name
        self.client = client
        self.down_until = 0.0
        self.error = ""


class RemoteNodes:
    """The server (``url``) or cluster nodes (``nodes``, or ``url`` with
    ``cluster``) of remote store ``name``, made with the client ``options``.

    ``errors`` are the client's connection errors and time-outs; each node
    failure is counted in :attr:`failures`, under ``lock``.
    """

    def __init__(
        self,
        name: str,
        *,
        url: str | None,
        nodes: Sequence[str],
        cluster: bool,
        options: dict[str, Any],
        retry_after: float,
        errors: tuple[type[BaseException], ...],
        lock: threading.Lock,
    ) -> None:
        import redis
        import redis.cluster

        self.name = name
        self.retry_after = retry_after
        self.errors = errors
        self.lock = lock
        self.failures = 0
        self.cluster: Any = None
        self.connect: Callable[[], Any] | None = None
        self.connect_lock = threading.Lock()
        self.entry = Node("cluster", None)  # when the cluster's map cannot be had
        self.by_name: dict[str, Node] = {}
        if nodes or cluster:
            startup = [
                redis.cluster.ClusterNode(*parse_node(n))  # type: ignore[no-untyped-call]
                for n in nodes
            ]
            kwargs = {"require_full_coverage": False, **options}
            if startup:
                self.connect = lambda: redis.cluster.RedisCluster(startup_nodes=startup, **kwargs)
            else:
                assert url is not None
                self.connect = lambda: redis.cluster.RedisCluster.from_url(url, **kwargs)
            self.where = ",".join(nodes) if nodes else masked_url(str(url))
        else:
            assert url is not None
            try:
                client = redis.Redis.from_url(url, redis_connect_func=_set_up, **options)
            except ValueError as exc:
                raise ConfigError(f"remote.url: {exc}") from None
            # The name shown in errors, logs and ``down``: never the password.
            self.where = masked_url(url)
            self.by_name["server"] = Node(self.where, client)

    def reason(self, exc: BaseException) -> str:
        """What a node's failure ``exc`` says in errors and logs."""
        import redis

        if self.connect is None and isinstance(exc, redis.exceptions.AskError):
            return (
                f"the server is a node of a cluster (it redirected a key: {exc}); "
                f"set cluster = true, or list the nodes"
            )
        return f"{type(exc).__name__}: {exc}"

    def groups(self, rkeys: list[bytes]) -> list[tuple[Node, list[int]]]:
        """The positions of ``rkeys`` grouped by the node that serves them."""
        if self.connect is None:
            return [(self.by_name["server"], list(range(len(rkeys))))]
        cluster = self.cluster_client()
        groups: dict[str, list[int]] = {}
        for pos, rkey in enumerate(rkeys):
            node = cluster.nodes_manager.get_node_from_slot(cluster.keyslot(rkey))
            groups.setdefault(node.name, []).append(pos)
            if node.name not in self.by_name:
                self.by_name[node.name] = Node(node.name, cluster.get_redis_connection(node))
        return [(self.by_name[name], positions) for name, positions in groups.items()]

    def batches(self, positions: list[int], step: int) -> Iterator[list[int]]:
        for i in range(0, len(positions), step):
            yield positions[i : i + step]

    def run(
        self,
        rkeys: list[bytes],
        execute: Callable[[Node, list[int]], list[Any]],
        result: Callable[[int, Any], None],
        what: str,
        step: int,
    ) -> list[int]:
        """Have ``execute(node, batch)`` run the commands of the positions of
        ``rkeys`` that ``node`` serves, in batches of ``step`` commands, and
        pass each reply to ``result(pos, reply)``. Returns the positions whose node
        failed or is down (their keys count as misses); raises RemoteUnavailable
        when the server failed, or in a cluster when every node is down."""
        failed: list[int] = []
        errors: list[str] = []
        now = time.monotonic()
        for node, positions in self.groups(rkeys):
            if node.down_until > now:
                failed += positions
                errors.append(f"{node.name}: {node.error} (retrying in {self.retry_after:g} s)")
                continue
            try:
                for batch in self.batches(positions, step):
                    replies = execute(node, batch)
                    for pos, reply in zip(batch, replies):
                        if isinstance(reply, self.errors):
                            raise reply
                        result(pos, reply)
            except self.errors as exc:
                node.down_until = time.monotonic() + self.retry_after
                node.error = self.reason(exc)
                errors.append(f"{node.name}: {node.error}")
                failed += positions
                if self.cluster is not None:
                    self.refresh(node.name)
            else:
                node.down_until = 0.0
        if failed:
            with self.lock:
                self.failures += len(errors)
            # In a cluster, keys on a dead node are misses while another node serves.
            now = time.monotonic()
            alive = self.connect is not None and any(
                n.down_until <= now for n in self.by_name.values()
            )
            if len(failed) == len(rkeys) and not alive:
                raise RemoteUnavailable(
                    f"remote {self.name!r}: {what} failed: " + "; ".join(errors[:4]),
                    self.retry_after,
                )
        return failed

    def cluster_client(self) -> Any:
        """The cluster client, made on first use (it reads the cluster's slot map,
        so it needs a node that answers: until then the store is down)."""
        with self.connect_lock:
            return self.cluster or self.open_cluster()

    def open_cluster(self) -> Any:
        entry = self.entry
        if entry.down_until > time.monotonic():
            raise RemoteUnavailable(
                f"remote {self.name!r}: {entry.error} (retrying in {self.retry_after:g} s)",
                self.retry_after,
            )
        assert self.connect is not None
        try:
            self.cluster = self.connect()
        except Exception as exc:  # RedisClusterException, ConnectionError, ...
            entry.down_until = time.monotonic() + self.retry_after
            entry.error = f"cannot reach the cluster {self.where}: {exc}"
            with self.lock:
                self.failures += 1
            raise RemoteUnavailable(
                f"remote {self.name!r}: {entry.error}", self.retry_after
            ) from exc
        entry.down_until = 0.0
        return self.cluster

    def refresh(self, failed: str) -> None:
        """Reload the cluster's map of slots, which may have changed (node
        ``failed`` failed over or left); where no node answers the old map stays.
        The other nodes are asked first (where redis-py's reload takes the failed
        node's name), so a node that hangs is not waited on twice in one call."""
        manager = self.cluster.nodes_manager
        options: dict[str, Any] = {}
        if "last_failed_node_name" in inspect.signature(manager.initialize).parameters:
            options["last_failed_node_name"] = failed
        with contextlib.suppress(Exception):  # RedisClusterException when no node answers
            manager.initialize(**options)
        self.by_name = {n: v for n, v in self.by_name.items() if self.known(n)}

    def known(self, name: str) -> bool:
        return self.cluster.get_node(node_name=name) is not None

    def ping(self, probe: bytes) -> bool:
        """Whether every known node answers now (marks them up or down); in a
        cluster, the node serving key ``probe`` is learnt first."""
        if self.connect is not None:
            try:
                self.groups([probe])  # makes the client, learns a node
            except RemoteUnavailable:
                return False
        ok = True
        for node in list(self.by_name.values()):
            try:
                node.client.ping()
            except self.errors as exc:
                node.down_until = time.monotonic() + self.retry_after
                node.error = self.reason(exc)
                ok = False
            else:
                node.down_until = 0.0
        return ok

    @property
    def down(self) -> list[str]:
        """Nodes currently left alone after a failure."""
        now = time.monotonic()
        nodes = [*self.by_name.values(), self.entry]
        return sorted(n.name for n in nodes if n.down_until > now)

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
        for node in self.by_name.values():
            if self.cluster is None:
                node.client.close()
        self.by_name = {}
