"""The Prometheus exporter, tested by scraping its HTTP endpoint on 127.0.0.1."""

from __future__ import annotations

import re
import socket
import urllib.error
import urllib.request
from typing import Any

import anyio
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import kvactors
from _redis import redis_server  # noqa: F401
from _served import BB, settled, small_config
from kvactors.cache.metrics import CacheMetrics, serve_metrics
from kvactors.cli.demo import block_bytes_for
from kvactors.config import Config, GPUConfig, MetricsConfig, RemoteConfig, TierConfig
from kvactors.errors import ConfigError, TierFailed
from kvactors.media.local_server import LocalServer
from kvactors.media.remote import RemoteStore

pytestmark = pytest.mark.anyio


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        body: bytes = reply.read()
        return body.decode()


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    text = await anyio.to_thread.run_sync(_get, url)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_scraped_metrics_match_the_cache_stats() -> None:
    keys = list(range(20))
    with anyio.fail_after(30):
        async with kvactors.open(small_config()) as kv:
            kv.gpu_pool.write_rows(keys, block_bytes_for(keys, BB, torch.device("cpu")))  # type: ignore[attr-defined]
            for i in range(0, 20, 4):
                await kv.store(keys[i : i + 4], keys[i : i + 4])
            await kv.lookup(keys)
            await kv.lookup([999])
            await kv.load(keys[:4], [40, 41, 42, 43])
            async with serve_metrics(kv, port=0, interval=0.05) as endpoint:
                assert endpoint.url.startswith("http://127.0.0.1:")
                stats = await kv.stats()
                samples = await scrape(endpoint.url)
                cpu = stats.policy.tiers["cpu"]
                found, missed = stats.policy.lookup_found, stats.policy.lookup_missed
                assert sample(samples, "kvactors_tier_hits_total", tier="cpu") == found["cpu"]
                assert sample(samples, "kvactors_tier_misses_total", tier="cpu") == missed["cpu"]
                assert sample(samples, "kvactors_tier_evictions_total", tier="cpu") == cpu.evictions
                assert cpu.evictions > 0  # 20 blocks through 8 CPU slots
                nvme_in = sample(samples, "kvactors_tier_bytes_total", tier="nvme", direction="in")
                assert nvme_in == stats.tiers["nvme"].bytes_written > 0
                assert sample(samples, "kvactors_tier_gbps", tier="nvme", direction="in") > 0
                assert sample(samples, "kvactors_tier_up", tier="nvme") == 1
                assert sample(samples, "kvactors_tier_blocks", tier="cpu", state="used") == 8
                assert sample(samples, "kvactors_requests_total", op="store") == 5
                p99 = sample(
                    samples, "kvactors_request_latency_seconds", op="load", quantile="0.99"
                )
                assert p99 > 0
                # Refreshed while serving: new work shows in a later scrape.
                await kv.lookup(keys)
                with anyio.fail_after(5):
                    while True:
                        later = await scrape(endpoint.url)
                        if sample(later, "kvactors_tier_hits_total", tier="cpu") > found["cpu"]:
                            break
                        await anyio.sleep(0.02)
            # Stopped with the block: nothing listens any more.
            with pytest.raises(urllib.error.URLError):
                await scrape(endpoint.url)


async def test_hits_and_misses_count_the_keys_a_lookup_found_in_each_tier() -> None:
    """A lookup whose keys lie in NVMe (the older ones) and CPU (the newer ones):
    each tier's scraped hits are the keys `LookupResult.tiers` names it for, and
    its misses the keys looked for there in vain (CPU: the NVMe keys and the key
    no tier holds; NVMe: that key), none for a key after that one."""
    keys = list(range(12))
    with anyio.fail_after(30):
        async with kvactors.open(small_config()) as kv:
            kv.gpu_pool.write_rows(keys, block_bytes_for(keys, BB, torch.device("cpu")))  # type: ignore[attr-defined]
            for i in range(0, 12, 4):
                assert await kv.store(keys[i : i + 4], keys[i : i + 4])
            result = await kv.lookup([*keys, 999, 1000])  # 1000: after the stop, not looked for
            assert result.hits == 12
            assert result.tiers == ["nvme"] * 4 + ["cpu"] * 8
            async with serve_metrics(kv, port=0, interval=0.05) as endpoint:
                samples = await scrape(endpoint.url)
                assert sample(samples, "kvactors_tier_hits_total", tier="nvme") == 4
                assert sample(samples, "kvactors_tier_hits_total", tier="cpu") == 8
                assert sample(samples, "kvactors_tier_misses_total", tier="cpu") == 5
                assert sample(samples, "kvactors_tier_misses_total", tier="nvme") == 1
                await kv.lookup([2, 3])  # both in NVMe: two more hits there
                with anyio.fail_after(5):
                    while True:
                        later = await scrape(endpoint.url)
                        if sample(later, "kvactors_tier_hits_total", tier="nvme") == 6:
                            break
                        await anyio.sleep(0.02)
                assert sample(later, "kvactors_tier_misses_total", tier="cpu") == 7
                assert sample(later, "kvactors_tier_hits_total", tier="cpu") == 8


async def test_a_crashed_tier_is_reported_down() -> None:
    def dead(*args: object) -> None:
        raise TierFailed("the device is gone")

    with anyio.fail_after(30):
        async with kvactors.open(small_config().replace(write_mode="write_through")) as kv:
            kv.medium("nvme").write_buffers = dead  # type: ignore[method-assign]
            await kv.store([1], torch.zeros(1, BB, dtype=torch.uint8))
            metrics = CacheMetrics()
            metrics.update(await kv.stats())
            text = "\n".join(
                f"{s.name}{s.labels}={s.value}" for f in metrics.collect() for s in f.samples
            )
            assert "kvactors_tier_up{'tier': 'nvme'}=0" in text
            assert "kvactors_tier_up{'tier': 'cpu'}=1" in text


async def test_recent_gbps_is_the_bytes_moved_between_two_refreshes_over_their_time() -> None:
    """`kvactors_tier_recent_gbps`: "GB/s of wall time between the last two
    refreshes", per tier and direction; 0 before a second refresh, and 0 again
    once nothing moved between two."""
    keys = list(range(8))
    with anyio.fail_after(30):
        async with kvactors.open(small_config()) as kv:
            metrics = CacheMetrics()
            before = await kv.stats()
            metrics.update(before, now=10.0)

            def recent() -> dict[tuple[str, str], float]:
                return {
                    (s.labels["tier"], s.labels["direction"]): s.value
                    for f in metrics.collect()
                    if f.name == "kvactors_tier_recent_gbps"
                    for s in f.samples
                }

            assert set(recent().values()) == {0.0}
            await kv.store(keys, block_bytes_for(keys, BB, torch.device("cpu")))
            after = await settled(kv)
            metrics.update(after, now=12.0)
            moved = sum(
                t.bytes
                for ts in after.tiers.values()
                for op, t in ts.transfers.items()
                if op.endswith("->cpu")
            ) - sum(
                t.bytes
                for ts in before.tiers.values()
                for op, t in ts.transfers.items()
                if op.endswith("->cpu")
            )
            assert moved == len(keys) * BB
            assert recent()[("cpu", "in")] == pytest.approx(moved / 2.0 / 1e9)
            metrics.update(after, now=13.0)
            assert recent()[("cpu", "in")] == 0.0


def test_two_exporters_do_not_clash() -> None:
    a, b = CacheMetrics(), CacheMetrics()
    assert a.registry is not b.registry
    assert list(a.collect()) == []  # nothing until the first update


async def test_metrics_port_in_the_config_serves_while_the_cache_is_open() -> None:
    config = small_config().replace(metrics={"port": 0})
    with anyio.fail_after(30):
        async with kvactors.open(config) as kv:
            assert kv.metrics_url is not None
            await kv.lookup([1])
            with anyio.fail_after(5):
                while True:
                    samples = await scrape(kv.metrics_url)
                    if sample(samples, "kvactors_requests_total", op="lookup") >= 1:
                        break
                    await anyio.sleep(0.05)
            url = kv.metrics_url
        with pytest.raises(urllib.error.URLError):
            await scrape(url)
        # `port = 0`: a free port on the default host, 127.0.0.1; no [metrics]: none served
        assert re.fullmatch(r"http://127\.0\.0\.1:([1-9]\d*)/metrics", url) is not None
        async with kvactors.open(small_config()) as plain:
            assert plain.metrics_url is None


async def test_an_address_the_exporter_cannot_listen_on_is_a_config_error_naming_it() -> None:
    """`[metrics]`: a `port` in use is a ConfigError naming `metrics.port`, a `host`
    that is no address of this machine one naming `metrics.host` (not the port),
    and an empty `host` (no address at all) is refused when
    the config is made."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with anyio.fail_after(30):
            with pytest.raises(ConfigError, match=rf"^metrics\.port: .*127\.0\.0\.1:{port}"):
                async with kvactors.open(small_config().replace(metrics={"port": port})):
                    pass
            config = small_config().replace(metrics={"port": 0, "host": "192.0.2.1"})
            with pytest.raises(ConfigError, match=r"^metrics\.host: .*192\.0\.2\.1"):
                async with kvactors.open(config):
                    pass
    with pytest.raises(ConfigError, match=r"metrics\.host"):
        Config.from_dict({"metrics": {"port": 0, "host": ""}})
    with pytest.raises(ConfigError, match="host"):
        MetricsConfig(host=" ")


async def test_the_metrics_url_of_an_ipv6_host_is_one_a_scraper_reads() -> None:
    """`host = "::1"`: `kv.metrics_url` writes the address in brackets, as URLs do."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    config = small_config().replace(metrics={"port": 0, "host": "::1"})
    with anyio.fail_after(30):
        async with kvactors.open(config) as kv:
            assert kv.metrics_url is not None
            assert re.fullmatch(r"http://\[::1\]:[1-9]\d*/metrics", kv.metrics_url)
            assert "kvactors_tier_up" in await anyio.to_thread.run_sync(_get, kv.metrics_url)


async def test_remote_misses_and_damaged_values_are_scraped_apart(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """A block gone from the server and one overwritten with garbage: the scrape
    counts one dropped block as ``missing``, one as ``corrupted``, and the
    remote's hits and misses as the store counted them (the block after each
    bad one arrived in the same read and stays promoted)."""
    cfg = Config(
        block_bytes=BB,
        gpu=GPUConfig(num_blocks=64, device="cpu"),
        cpu=TierConfig(num_blocks=16),
        nvme=None,
        remote=RemoteConfig(url=redis_server.url),
    )
    keys = list(range(6))
    names = RemoteStore("remote", BB, url=redis_server.url)
    with anyio.fail_after(30):
        async with kvactors.open(cfg) as a:
            await a.store(keys, block_bytes_for(keys, BB, torch.device("cpu")))
        client = redis_server.client()
        assert client.delete(names.redis_key(2)) == 1
        client.set(names.redis_key(4), b"not a block")
        async with kvactors.open(cfg) as b:
            out = torch.zeros(2, BB, dtype=torch.uint8)
            assert len((await b.load(keys[:2], out, partial=True)).tiers) == 2
            assert (await b.load(keys[2:4], out, partial=True)).tiers == []
            assert (await b.load(keys[4:6], out, partial=True)).tiers == []
            async with serve_metrics(b, port=0, interval=0.05) as endpoint:
                samples = await scrape(endpoint.url)
                stats = await b.stats()
    names.close()
    assert sample(samples, "kvactors_dropped_blocks_total", reason="missing") == 1
    assert sample(samples, "kvactors_dropped_blocks_total", reason="corrupted") == 1
    assert (stats.policy.missing, stats.policy.corrupted) == (1, 1)
    assert stats.remote is not None
    assert sample(samples, "kvactors_tier_hits_total", tier="remote") == stats.remote.hits == 4
    assert stats.policy.tiers["cpu"].used == 4
    assert sample(samples, "kvactors_tier_misses_total", tier="remote") == 2
    # the remote tier's evictions are the values it refused as damaged
    assert sample(samples, "kvactors_tier_evictions_total", tier="remote") == 1


async def test_the_remote_tier_is_scraped_once_per_series_and_shows_a_dead_server(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """The remote tier's bytes and GB/s per direction, its hits, its failures and
    whether it is up, one series each (an exposition Prometheus accepts: no
    sample twice); after the server dies a full load that needed it fails and is
    counted, and the tier shows as down and failed."""
    from prometheus_client import generate_latest

    from kvactors.errors import RemoteUnavailable

    cfg = Config(
        block_bytes=BB,
        gpu=GPUConfig(num_blocks=64, device="cpu"),
        cpu=TierConfig(num_blocks=16),
        nvme=None,
        remote=RemoteConfig(url=redis_server.url, timeout=0.5, retry_after=30),
    )
    keys = list(range(8))
    with anyio.fail_after(30):
        async with kvactors.open(cfg) as a:
            await a.store(keys, block_bytes_for(keys, BB, torch.device("cpu")))
        async with kvactors.open(cfg) as b:
            out = torch.zeros(4, BB, dtype=torch.uint8)
            await b.load(keys[:4], out)
            metrics = CacheMetrics()
            metrics.update(await b.stats(), now=0.0)
            metrics.update(await b.stats(), now=1.0)
            lines = [
                line
                for line in generate_latest(metrics.registry).decode().splitlines()
                if not line.startswith("#")
            ]
            series = [line.rsplit(" ", 1)[0] for line in lines]
            assert len(series) == len(set(series))
            async with serve_metrics(b, port=0, interval=0.05) as endpoint:
                samples = await scrape(endpoint.url)
                assert sample(samples, "kvactors_tier_hits_total", tier="remote") == 4
                out_bytes = sample(
                    samples, "kvactors_tier_bytes_total", tier="remote", direction="out"
                )
                assert out_bytes == 4 * BB
                assert sample(samples, "kvactors_tier_gbps", tier="remote", direction="out") > 0
                assert (
                    sample(samples, "kvactors_tier_bytes_total", tier="cpu", direction="in")
                    == 4 * BB
                )
                assert sample(samples, "kvactors_tier_up", tier="remote") == 1
                assert sample(samples, "kvactors_tier_failures_total", tier="remote") == 0
                redis_server.kill()
                with pytest.raises(RemoteUnavailable):
                    await b.load(keys[4:], out)
                with anyio.fail_after(5):
                    while True:
                        samples = await scrape(endpoint.url)
                        if sample(samples, "kvactors_tier_up", tier="remote") == 0:
                            break
                        await anyio.sleep(0.05)
                assert sample(samples, "kvactors_tier_failures_total", tier="remote") >= 1
                assert sample(samples, "kvactors_failed_requests_total", op="load") == 1
                assert sample(samples, "kvactors_tier_up", tier="cpu") == 1
