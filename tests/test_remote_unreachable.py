"""A remote URL where no Valkey / Redis server answers: nothing listens there,
or another kind of server does (a wrong port). The cache treats both as a
server that is down (docs/remote.md, failure behaviour), and ``kvactors bench
remote --url`` says so in one line with exit status 2.

The listener here is a real HTTP server from the standard library: the point
is a service that is not Valkey / Redis, not a stand-in for one."""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Iterator

import anyio
import pytest

import kvactors
from _docs import DOCS
from kvactors.cli import main
from kvactors.media.local_server import free_port

REMOTE_MD = DOCS / "remote.md"


class _Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def remote_config(port: int) -> kvactors.Config:
    return kvactors.Config.from_dict(
        {
            "block_bytes": 4096,
            "gpu": {"num_blocks": 8, "device": "cpu"},
            "cpu": {"num_blocks": 4},
            "nvme": None,
            "remote": {"url": f"redis://127.0.0.1:{port}/0", "timeout": 1.0, "retry_after": 600.0},
        }
    )


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["nothing listens", "an HTTP server"])
async def test_a_url_without_a_redis_server_is_a_server_that_is_down(
    kind: str, request: pytest.FixtureRequest
) -> None:
    port = free_port() if kind == "nothing listens" else request.getfixturevalue("http_port")
    with anyio.fail_after(60):
        async with kvactors.open(remote_config(port)) as kv:
            assert (await kv.lookup([1, 2])).hits == 0
            stored = await kv.store([1, 2], range(2))
            assert stored is not None
            assert stored.stored == 2
            assert (await kv.load([1, 2], range(2, 4))).tiers == ["cpu", "cpu"]
            # a partial load of keys held nowhere: what the local tiers hold (nothing)
            assert (await kv.load([9], range(1), partial=True)).tiers == []
            assert (await kv.stats()).tiers["remote"].crashed


@pytest.mark.parametrize("kind", ["nothing listens", "an HTTP server"])
def test_bench_remote_with_a_url_where_no_server_answers_exits_2_in_one_line(
    kind: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port() if kind == "nothing listens" else request.getfixturevalue("http_port")
    url = f"redis://127.0.0.1:{port}/0"
    argv = ["bench", "remote", "--url", url, "--sizes", "16", "--mib", "1", "--repeat", "1"]
    assert main([*argv, "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"kvactors: error: bench remote: no server answers at {url}\n"
    # the line docs/remote.md gives, URL standing for the one asked
    line = re.search(r"`(kvactors: error: bench remote: [^`]*)`", REMOTE_MD.read_text())
    assert line is not None
    assert err == line.group(1).replace("URL", url) + "\n"
