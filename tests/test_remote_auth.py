"""The remote tier against servers that require a login (docs/remote.md,
"Authentication"): ``requirepass``, an ACL user with only the commands the tier
sends on its key pattern, a 3-node cluster with a password; a wrong password or
a denied command is a typed error with the tier down, never a hang or a bare
redis exception; the password shows nowhere (errors, ``down``, stats, logs,
reprs). Real servers on 127.0.0.1, a free port each."""

from __future__ import annotations

import logging
import os
import time
import urllib.request
from collections.abc import Iterator

import anyio
import pytest

import kvactors
from _redis import server_binary
from kvactors.config import RemoteConfig
from kvactors.errors import ConfigError, RemoteUnavailable
from kvactors.media.local_server import LocalCluster, LocalServer
from kvactors.media.remote import RemoteStore
from kvactors.media.remote_nodes import masked_url, url_credentials

BB = 8192
SECRET = "s3cret-Pw"
KV_PW = "kv-Pw-42"
# What the tier sends on one server, as docs/remote.md lists it for an ACL user.
TIER_ACL = ["~kvactors:*", "+get", "+set", "+exists", "+del", "+ping"]


@pytest.fixture
def auth_server() -> Iterator[LocalServer]:
    """A server with ``requirepass`` and an ACL user ``kv`` allowed the tier's
    commands on ``kvactors:*`` keys only."""
    with LocalServer(password=SECRET, binary=server_binary()) as server:
        admin = server.client()
        admin.execute_command("ACL", "SETUSER", "kv", "on", f">{KV_PW}", *TIER_ACL)
        admin.execute_command("ACL", "LOG", "RESET")
        admin.close()
        yield server


def blocks(n: int) -> list[memoryview]:
    return [memoryview(bytearray(os.urandom(BB))) for _ in range(n)]


def url_of(server: LocalServer, userinfo: str) -> str:
    return f"redis://{userinfo}@127.0.0.1:{server.port}/0"


def round_trip(store: RemoteStore) -> None:
    """Store and load byte-exact, staged and in place; lookups; deletes."""
    keys: list[int | bytes] = [*range(20), b"k" * 32]
    sent = blocks(len(keys))
    assert store.put(keys, sent) == []
    got = [memoryview(bytearray(BB)) for _ in keys]
    assert store.fetch(keys, got) == ([], [])
    assert [bytes(g) for g in got] == [bytes(s) for s in sent]
    in_place = [memoryview(bytearray(BB)) for _ in keys]
    assert store.fetch(keys, in_place, in_place=True) == ([], [])
    assert [bytes(g) for g in in_place] == [bytes(s) for s in sent]
    assert store.contains([0, 999]) == [True, False]
    store.delete([0])
    assert store.contains([0]) == [False]
    assert store.ping()


def test_a_requirepass_server_through_a_password_url(auth_server: LocalServer) -> None:
    store = RemoteStore("remote", BB, url=url_of(auth_server, f":{SECRET}"), timeout=2.0)
    try:
        round_trip(store)
        assert SECRET not in store.where
        assert SECRET not in repr(store.counters())
    finally:
        store.close()


def test_a_password_with_url_characters_logs_in_percent_encoded() -> None:
    """Percent-encode `@`, `/`, `?`, `#` and `%` in a URL's user name or password
    (`p%40ss` for `p@ss`); redis-py decodes them: such a password logs in from
    the URL as from the `password` key, and neither form shows it; LocalServer's
    own `url` carries it encoded."""
    password = "p@ss/w?r#d%1"
    encoded = "p%40ss%2Fw%3Fr%23d%251"
    with LocalServer(password=password, binary=server_binary()) as server:
        assert server.url == url_of(server, f":{encoded}")
        plain = f"redis://127.0.0.1:{server.port}/0"
        for store, where in (
            (RemoteStore("remote", BB, url=url_of(server, f":{encoded}")), url_of(server, ":***")),
            (RemoteStore("remote", BB, url=plain, password=password), plain),
        ):
            try:
                round_trip(store)
                assert store.where == where
            finally:
                store.close()
        shown = repr(RemoteConfig(url=url_of(server, f":{encoded}")))
        assert encoded not in shown
        assert url_of(server, ":***") in shown


def test_an_acl_user_with_only_the_tier_commands(auth_server: LocalServer) -> None:
    """The commands docs/remote.md lists are all the tier sends: the server's ACL
    LOG records no refusal but redis-py's optional ``CLIENT SETINFO`` (whose
    error redis-py ignores)."""
    store = RemoteStore("remote", BB, url=url_of(auth_server, f"kv:{KV_PW}"), timeout=2.0)
    expiring = RemoteStore("remote", BB, url=url_of(auth_server, f"kv:{KV_PW}"), ttl=60.0)
    try:
        round_trip(store)
        assert expiring.put([5], blocks(1)) == []  # SET ... PX: no other command
    finally:
        store.close()
        expiring.close()
    admin = auth_server.client()
    refused = {(e["reason"], e["object"]) for e in admin.acl_log()}
    admin.close()
    assert refused <= {("command", "client|setinfo")}


def test_username_and_password_keys_instead_of_the_url(auth_server: LocalServer) -> None:
    store = RemoteStore(
        "remote", BB, url=auth_server.url.replace(f":{SECRET}@", ""), username="kv", password=KV_PW
    )
    try:
        round_trip(store)
    finally:
        store.close()


@pytest.mark.parametrize("userinfo", [":wrong", "kv:wrong", "nobody:x", ""])
def test_a_wrong_or_missing_password_is_remote_unavailable_naming_no_secret(
    auth_server: LocalServer, userinfo: str
) -> None:
    url = url_of(auth_server, userinfo) if userinfo else auth_server.url.replace(f":{SECRET}@", "")
    store = RemoteStore("remote", BB, url=url, timeout=2.0, retry_after=30.0)
    t0 = time.monotonic()
    try:
        with pytest.raises(RemoteUnavailable, match="AuthenticationError") as raised:
            store.put([1], blocks(1))
        # then down: calls fail at once, naming why
        with pytest.raises(RemoteUnavailable, match=r"AuthenticationError.*retrying"):
            store.fetch([1], [memoryview(bytearray(BB))])
        assert not store.ping()
        assert time.monotonic() - t0 < 5.0
        shown = [str(raised.value), store.where, repr(store.counters()), *store.down]
        assert store.down == [masked_url(url)]
        for text in shown:
            assert "wrong" not in text
            assert SECRET not in text
    finally:
        store.close()


def test_a_user_denied_get_or_the_key_pattern_is_down_not_misses(
    auth_server: LocalServer,
) -> None:
    """``NOPERM`` (a command or key the ACL denies) marks the server down with its
    reason: before, a denied ``GET`` (read off the socket by the tier's own wire
    code) was a damaged value, and a denied key pattern silent misses."""
    admin = auth_server.client()
    admin.execute_command(
        "ACL", "SETUSER", "noget", "on", ">pw", "~kvactors:*", "+set", "+exists", "+del", "+ping"
    )
    admin.execute_command("ACL", "SETUSER", "other", "on", ">pw", "~other:*", *TIER_ACL[1:])
    admin.close()
    noget = RemoteStore("remote", BB, url=url_of(auth_server, "noget:pw"), retry_after=30.0)
    other = RemoteStore("remote", BB, url=url_of(auth_server, "other:pw"), retry_after=30.0)
    try:
        assert noget.put([1, 2], blocks(2)) == []
        with pytest.raises(RemoteUnavailable, match=r"NoPermissionError.*'get'"):
            noget.fetch([1, 2], [memoryview(bytearray(BB)) for _ in range(2)])
        assert noget.counters().corrupt == 0
        assert noget.down == [noget.where]
        for call in (
            lambda: other.put([1], blocks(1)),
            lambda: other.contains([1]),
            lambda: other.fetch([1], [memoryview(bytearray(BB))]),
        ):
            with pytest.raises(RemoteUnavailable, match="NoPermissionError"):
                call()
        assert other.counters().corrupt == 0
    finally:
        noget.close()
        other.close()


def test_masked_url_and_url_credentials() -> None:
    cases = {
        "redis://:pw@h:1/0": ("redis://:***@h:1/0", (None, "pw")),
        "redis://kv:p%40w@h:1/0": ("redis://kv:***@h:1/0", ("kv", "p@w")),
        "rediss://kv:a:b@h/0": ("rediss://kv:***@h/0", ("kv", "a:b")),
        "redis://h:1/0?password=pw&db=1": ("redis://h:1/0?password=***&db=1", (None, "pw")),
        "unix://kv:pw@/run/v.sock?db=0": ("unix://kv:***@/run/v.sock?db=0", ("kv", "pw")),
        "redis://kv@h/0": ("redis://kv@h/0", ("kv", None)),
        "redis://h:1/0": ("redis://h:1/0", (None, None)),
    }
    for url, (masked, credentials) in cases.items():
        assert masked_url(url) == masked
        assert url_credentials(url) == credentials


def test_a_password_in_the_url_and_in_the_password_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"remote\.password.*:\*\*\*@.*in one place") as raised:
        RemoteConfig(url="redis://:pw1@h:1/0", password="pw2")
    assert "pw1" not in str(raised.value)
    with pytest.raises(ConfigError, match=r"remote\.username"):
        RemoteConfig(url="redis://kv:pw@h:1/0", username="kv")
    with pytest.raises(ConfigError, match=r"remote\.password"):
        RemoteStore("remote", BB, url="redis://h:1/0?password=pw1", password="pw2")
    with pytest.raises(ConfigError, match=r"remote\.password: expected a non-empty"):
        RemoteConfig(url="redis://h:1/0", password="")
    # nodes override url: the (default) url's credentials do not count
    RemoteConfig(url="redis://:pw1@h:1/0", nodes=["h:1"], password="pw2")
    with pytest.raises(ConfigError, match=r"url: .*:\*\*\*@") as raised:
        RemoteConfig(url="http://:pw1@h:1/0")
    assert "pw1" not in str(raised.value)


def test_the_config_repr_masks_the_password() -> None:
    config = kvactors.Config.from_dict(
        {"block_bytes": BB, "remote": {"url": "redis://kv:pw1@h:1/0"}}
    )
    assert "pw1" not in repr(config)
    assert "kv:***@h:1" in repr(config)
    assert config.remote is not None
    assert config.remote.url == "redis://kv:pw1@h:1/0"  # the value itself is kept
    keys = RemoteConfig(nodes=["h:1"], username="kv", password="pw2")
    assert "pw2" not in repr(keys)
    assert "password='***'" in repr(keys)


def cache_config(url: str, **more: object) -> kvactors.Config:
    return kvactors.Config.from_dict(
        {
            "block_bytes": BB,
            "gpu": {"num_blocks": 16, "device": "cpu"},
            "cpu": {"num_blocks": 16},
            "nvme": None,
            "remote": {"url": url, "timeout": 1.0, "retry_after": 600.0},
            **more,
        }
    )


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode()
        return text


@pytest.mark.anyio
async def test_a_cache_through_an_acl_user_shares_blocks_byte_exact(
    auth_server: LocalServer,
) -> None:
    import torch

    rows = torch.randint(0, 256, (6, BB), dtype=torch.uint8)
    with anyio.fail_after(60):
        async with kvactors.open(cache_config(url_of(auth_server, f"kv:{KV_PW}"))) as kv:
            assert (await kv.store(list(range(6)), rows)) is not None
        # another cache, empty local tiers: every block from the server
        async with kvactors.open(cache_config(url_of(auth_server, f"kv:{KV_PW}"))) as kv:
            assert (await kv.lookup(list(range(6)))).tiers == ["remote"] * 6
            out = torch.zeros_like(rows)
            loaded = await kv.load(list(range(6)), out)
            assert loaded.tiers == ["remote"] * 6
            assert torch.equal(out, rows)


@pytest.mark.anyio
async def test_a_wrong_password_leaves_the_local_tiers_serving_and_shows_no_secret(
    auth_server: LocalServer, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    caplog.set_level(logging.DEBUG)
    rows = torch.randint(0, 256, (2, BB), dtype=torch.uint8)
    url = url_of(auth_server, ":wrong-Pw")
    with anyio.fail_after(60):
        async with kvactors.open(cache_config(url, metrics={"port": 0})) as kv:
            assert (await kv.lookup([1, 2])).hits == 0
            stored = await kv.store([1, 2], rows)
            assert stored is not None
            assert stored.stored == 2
            out = torch.zeros_like(rows)
            assert (await kv.load([1, 2], out)).tiers == ["cpu", "cpu"]
            assert torch.equal(out, rows)
            partial = await kv.load([9], torch.zeros((1, BB), dtype=torch.uint8), partial=True)
            assert partial.tiers == []
            stats = await kv.stats()
            assert stats.tiers["remote"].crashed
            assert stats.remote is not None
            assert stats.remote.down == [masked_url(url)]
            assert kv.metrics_url is not None
            await anyio.sleep(1.2)  # the exporter refreshes every second
            metrics = await anyio.to_thread.run_sync(scrape, kv.metrics_url)
            assert 'kvactors_tier_up{tier="remote"} 0.0' in metrics
            assert f"127.0.0.1:{auth_server.port}" not in metrics  # labels name tiers only
            for text in (repr(stats), repr(kv.config), caplog.text, metrics):
                assert "wrong-Pw" not in text


# -- a cluster with a password ---------------------------------------------------------


@pytest.fixture
def auth_cluster() -> Iterator[LocalCluster]:
    """3 nodes with ``requirepass`` / ``masterauth``, and user ``kv`` on each with
    the tier's commands plus those redis-py's cluster client sends."""
    with LocalCluster(3, password=SECRET, binary=server_binary()) as cluster:
        for server in cluster.servers:
            admin = server.client()
            admin.execute_command(
                "ACL", "SETUSER", "kv", "on", f">{KV_PW}", *TIER_ACL, "+cluster|slots", "+command"
            )
            admin.execute_command("ACL", "LOG", "RESET")
            admin.close()
        yield cluster


def spread(cluster: LocalCluster) -> list[int]:
    return [len(s.client().keys(b"kvactors:*")) for s in cluster.servers]


@pytest.mark.parametrize("login", ["password", "acl user", "url"])
def test_a_cluster_with_a_password(auth_cluster: LocalCluster, login: str) -> None:
    """``nodes`` with the ``password`` (and ``username``) keys, or one node's URL
    carrying them with ``cluster = true``: every node is logged in to."""
    if login == "password":
        store = RemoteStore("remote", BB, nodes=auth_cluster.nodes, password=SECRET)
    elif login == "acl user":
        store = RemoteStore("remote", BB, nodes=auth_cluster.nodes, username="kv", password=KV_PW)
    else:
        url = f"redis://kv:{KV_PW}@{auth_cluster.nodes[2]}/0"
        store = RemoteStore("remote", BB, url=url, cluster=True)
        assert KV_PW not in store.where
    try:
        keys = list(range(60))
        sent = blocks(len(keys))
        assert store.put(keys, sent) == []
        got = [memoryview(bytearray(BB)) for _ in keys]
        assert store.fetch(keys, got) == ([], [])
        assert [bytes(g) for g in got] == [bytes(s) for s in sent]
        assert store.contains([1, 999]) == [True, False]
        assert min(spread(auth_cluster)) > 5  # every node took its share
        assert store.ping()
    finally:
        store.close()
    for server in auth_cluster.servers:
        refused = {(e["reason"], e["object"]) for e in server.client().acl_log()}
        assert refused <= {("command", "client|setinfo")}


@pytest.mark.parametrize("how", ["password key", "url"])
def test_a_cluster_with_a_wrong_password_is_down_naming_no_secret(
    auth_cluster: LocalCluster, how: str
) -> None:
    if how == "url":
        url = f"redis://:wrong-Pw@{auth_cluster.nodes[0]}/0"
        store = RemoteStore("remote", BB, url=url, cluster=True, timeout=1.0)
    else:
        store = RemoteStore("remote", BB, nodes=auth_cluster.nodes, password="wrong-Pw")
    t0 = time.monotonic()
    try:
        with pytest.raises(RemoteUnavailable, match="invalid username-password") as raised:
            store.put([1], blocks(1))
        assert time.monotonic() - t0 < 10.0
        assert "wrong-Pw" not in str(raised.value)
        assert "wrong-Pw" not in repr(store.counters())
        assert store.down == ["cluster"]
    finally:
        store.close()


@pytest.mark.anyio
async def test_a_cache_on_a_cluster_with_the_username_and_password_keys(
    auth_cluster: LocalCluster,
) -> None:
    import torch

    config = kvactors.Config.from_dict(
        {
            "block_bytes": BB,
            "gpu": {"num_blocks": 16, "device": "cpu"},
            "cpu": {"num_blocks": 16},
            "nvme": None,
            "remote": {"nodes": auth_cluster.nodes, "username": "kv", "password": KV_PW},
        }
    )
    rows = torch.randint(0, 256, (12, BB), dtype=torch.uint8)
    with anyio.fail_after(60):
        async with kvactors.open(config) as kv:
            assert (await kv.store(list(range(12)), rows)) is not None
        async with kvactors.open(config) as kv:
            out = torch.zeros_like(rows)
            assert (await kv.load(list(range(12)), out)).tiers == ["remote"] * 12
            assert torch.equal(out, rows)
            assert KV_PW not in repr(await kv.stats())


@pytest.mark.parametrize("in_place", [False, True])
def test_a_server_that_comes_back_wanting_a_password_is_down_not_misses(in_place: bool) -> None:
    """A server restarted with ``requirepass`` under a tier that has no password:
    its ``-NOAUTH`` replies (read off the socket by the tier's own ``GET`` code,
    and by redis-py for ``SET`` / ``EXISTS``) mark the tier down with the
    server's reason; no value counts as damaged, none as a miss."""
    with LocalServer(binary=server_binary()) as server:
        store = RemoteStore("remote", BB, url=server.url, retry_after=30.0, timeout=2.0)
        try:
            assert store.put([1, 2], blocks(2)) == []
            server.kill()
            server.password = SECRET
            server.start()
            got = [memoryview(bytearray(BB)) for _ in range(2)]
            with pytest.raises(RemoteUnavailable, match=r"(?i)auth"):
                store.fetch([1, 2], got, in_place=in_place)
            counters = store.counters()
            assert counters.corrupt == 0
            assert store.down == [store.where]
            assert SECRET not in repr(counters)
        finally:
            store.close()
        fresh = RemoteStore("remote", BB, url=server.url, timeout=2.0)  # with the password
        try:
            assert fresh.contains([1, 2]) == [False, False]  # the restarted server is empty
        finally:
            fresh.close()
