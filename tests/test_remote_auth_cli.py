"""A password in the URL of ``kvactors demo --remote``, ``kvactors bench remote
--url`` and the vLLM backend's ``remote_url``: accepted, and shown nowhere (the
table, the JSON summary, error lines, reprs). Real servers on 127.0.0.1 with
``requirepass``, a free port each."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from _redis import server_binary
from kvactors.cli import main
from kvactors.errors import ConfigError
from kvactors.media.local_server import LocalServer, free_port
from kvactors.media.remote import RemoteStore
from kvactors.vllm import parse_settings

SECRET = "s3cret-Pw"


@pytest.fixture
def auth_server() -> Iterator[LocalServer]:
    with LocalServer(password=SECRET, binary=server_binary()) as server:
        yield server


def test_demo_with_a_password_url_shows_it_masked(
    auth_server: LocalServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--trace", "synthetic", "--requests", "20", "--no-nvme", "--device", "cpu"]
    argv += ["--remote", auth_server.url]
    assert main([*argv, "--json"]) == 0
    out, err = capsys.readouterr()
    assert SECRET not in out + err
    summary = json.loads(out.strip().splitlines()[-1])["summary"]
    assert summary["config"]["remote"]["url"] == f"redis://:***@127.0.0.1:{auth_server.port}/0"
    assert summary["hits_remote"] >= 0
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "in remote" in out
    assert SECRET not in out + err


def test_bench_remote_with_a_password_url_shows_it_masked(
    auth_server: LocalServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nor is it on the command line of the two replay processes (which every
    user of the machine can list): they get it by environment."""
    started: list[list[str]] = []
    real_popen = subprocess.Popen

    def popen(cmd: list[str], **kwargs: Any) -> Any:
        started.append(list(cmd))
        return real_popen(cmd, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    argv = ["bench", "remote", "--url", auth_server.url, "--sizes", "16", "--mib", "1"]
    argv += ["--repeat", "1", "--trace", "synthetic", "--requests", "4"]
    masked = f"redis://:***@127.0.0.1:{auth_server.port}/0"
    assert main([*argv, "--json"]) == 0
    out, err = capsys.readouterr()
    assert SECRET not in out + err
    assert json.loads(out.strip().splitlines()[-1])["summary"]["url"] == masked
    assert len(started) == 4  # two processes, alone and sharing
    assert all(SECRET not in " ".join(cmd) for cmd in started)
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert f"server: {masked};" in out
    assert SECRET not in out + err


def test_bench_remote_with_a_wrong_password_exits_2_in_one_masked_line(
    auth_server: LocalServer, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://:wrong-Pw@127.0.0.1:{auth_server.port}/0"
    argv = ["bench", "remote", "--url", url, "--sizes", "16", "--mib", "1", "--repeat", "1"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"kvactors: error: bench remote: the server at redis://:***@127.0.0.1:"
        f"{auth_server.port}/0 refused the login: AuthenticationError: invalid "
        "username-password pair or user is disabled.\n"
    )


def test_vllm_remote_url_with_a_password_is_accepted_and_shown_masked() -> None:
    url = "redis://kv:pw-Secret@10.0.0.1:6379/0"
    settings = parse_settings({"cpu_bytes": 1 << 20, "remote_url": url})
    assert settings.remote_url == url  # passed on to the store as it is
    assert settings.remote
    assert "pw-Secret" not in repr(settings)
    assert "remote_url='redis://kv:***@10.0.0.1:6379/0'" in repr(settings)
    with pytest.raises(ConfigError, match=r"remote_url.*kv:\*\*\*@") as raised:
        parse_settings({"cpu_bytes": 1, "remote_url": "http://kv:pw-Secret@h/0"})
    assert "pw-Secret" not in str(raised.value)


@pytest.mark.parametrize(
    "url",
    ["redis://:pw-Secret@h:abc/0", "redis://:pw-Secret@h:6379/db0", "redis://:pw-Secret@h/0?foo=1",
     "unix://:pw-Secret@"],
)  # fmt: skip
def test_a_vllm_remote_url_redis_py_cannot_use_is_a_config_error_naming_remote_url(
    url: str,
) -> None:
    """The vLLM backend's `remote_url` is checked as `[remote] url` is (a port, a
    database path, a query argument, a socket path), when the settings are
    parsed, and the error names `remote_url`, its password masked."""
    with pytest.raises(
        ConfigError, match=r"^kv_connector_extra_config\['remote_url'\]: "
    ) as raised:
        parse_settings({"cpu_bytes": 1 << 20, "remote_url": url})
    assert "pw-Secret" not in str(raised.value)
    assert "***" in str(raised.value)


def test_vllm_remote_username_and_password_log_in_to_nodes(auth_server: LocalServer) -> None:
    """``remote_nodes`` has no place for a login: ``remote_username`` /
    ``remote_password`` carry it, to the store the spec opens (with its keys)."""
    admin = auth_server.client()
    admin.execute_command(
        "ACL", "SETUSER", "kv", "on", ">kv-Pw", "~kvactors:*", "+get", "+set", "+exists", "+del"
    )
    admin.close()
    extra = {"cpu_bytes": 1 << 20, "remote_username": "kv", "remote_password": "kv-Pw"}
    settings = parse_settings({**extra, "remote_url": auth_server.url.replace(f":{SECRET}@", "")})
    assert "kv-Pw" not in repr(settings)
    assert "remote_password='***'" in repr(settings)
    store = RemoteStore(
        "remote0",
        4096,
        url=settings.remote_url,
        nodes=settings.remote_nodes,
        username=settings.remote_username,
        password=settings.remote_password,
    )
    try:
        block = memoryview(bytearray(os.urandom(4096)))
        assert store.put([1], [block]) == []
        out = memoryview(bytearray(4096))
        assert store.get_into([1], [out]) == []
        assert bytes(out) == bytes(block)
    finally:
        store.close()
    nodes = parse_settings({**extra, "remote_nodes": ["10.0.0.1:7000"]})
    assert (nodes.remote_username, nodes.remote_password) == ("kv", "kv-Pw")
    for key, url in (
        ("remote_password", "redis://:url-Pw@h:1/0"),
        ("remote_username", "redis://kv@h:1/0"),
    ):
        with pytest.raises(ConfigError, match=rf"'{key}'.*in one place") as raised:
            parse_settings({**extra, "remote_url": url})
        assert "url-Pw" not in str(raised.value)
    with pytest.raises(ConfigError, match=r"'remote_password'.*got \*\*\*"):
        parse_settings({"cpu_bytes": 1, "remote_password": ""})


def test_demo_with_no_server_at_its_remote_url_is_one_line_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # As bench remote --url (docs/remote.md): the demo's remote tier is what it
    # shows, so a server that does not answer is an error before anything runs.
    url = f"redis://127.0.0.1:{free_port()}/0"
    argv = ["demo", "--trace", "synthetic", "--requests", "20", "--no-nvme", "--device", "cpu"]
    assert main([*argv, "--remote", url, "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"kvactors: error: demo: no server answers at {url}\n"


def test_demo_whose_server_refuses_the_login_is_one_line_exit_2(
    auth_server: LocalServer, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://:wrong-{SECRET}@127.0.0.1:{auth_server.port}/0"
    argv = ["demo", "--trace", "synthetic", "--requests", "20", "--no-nvme", "--device", "cpu"]
    assert main([*argv, "--remote", url]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(
        f"kvactors: error: demo: the server at redis://:***@127.0.0.1:{auth_server.port}/0 "
        "refused the login: "
    )
    assert err.count("\n") == 1
    assert SECRET not in err
