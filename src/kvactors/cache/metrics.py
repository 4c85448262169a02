"""Prometheus metrics of a cache: every tier's hits, misses, bytes and GB/s per
direction, evictions, failures, and request latency, for dashboards.

:class:`CacheMetrics` is a ``prometheus_client`` collector over the latest
:class:`~kvactors.cache.results.CacheStats` it was given
(:meth:`CacheMetrics.update`); :func:`serve_metrics` refreshes it from a
running cache every ``interval`` seconds and serves it over HTTP::

    async with kvactors.open(config) as kv, serve_metrics(kv, port=9400):
        ...  # curl http://127.0.0.1:9400/metrics

With ``[metrics] port = ...`` in the config, ``kvactors.open`` does this
itself. Needs the ``metrics`` extra (``pip install 'kvactors[metrics]'``).

Families (each prefixed ``kvactors_``; ``tier`` is ``gpu``, ``cpu``, ``nvme`` or
``remote``; ``direction`` is ``in``, written into the tier, or ``out``, read from
it); docs/remote.md lists them with their types:

- ``tier_hits_total`` / ``tier_misses_total`` (tier): keys found / not found
  (local tiers: the keys lookups found in the tier, and those they looked for
  there in vain, ``stats().policy.lookup_found`` / ``lookup_missed``; the remote:
  its reads, damaged values counted as misses);
- ``tier_bytes_total`` (tier, direction): bytes moved;
- ``tier_gbps`` (tier, direction): GB/s while transferring (bytes / busy seconds);
- ``tier_recent_gbps`` (tier, direction): GB/s of wall time between the last
  two refreshes;
- ``tier_evictions_total`` (tier): blocks evicted (the remote: values refused
  as damaged, as the server's own evictions are not visible to a client);
- ``tier_failures_total`` (tier): failed jobs (the remote: node failures);
- ``tier_up`` (tier): 1 when the tier serves, 0 when crashed or down;
- ``tier_blocks`` (tier, state): ``used``, ``free``, ``pinned`` slots;
- ``request_latency_seconds`` (op, quantile): p50 / p99 of ``lookup``,
  ``store``, ``load``; ``requests_total`` (op): requests measured;
- ``failed_requests_total`` (op): failed ``store`` / ``load`` calls;
- ``dropped_blocks_total`` (reason): blocks dropped when read, ``corrupted``
  (failed their checks) or ``missing`` (a shared tier's server no longer had
  them: evicted or expired).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import anyio

from kvactors.errors import ConfigError, KVActorsError

if TYPE_CHECKING:
    from kvactors.cache.handle import KVCache
    from kvactors.cache.results import CacheStats

__all__ = ["CacheMetrics", "MetricsEndpoint", "serve_metrics"]


def _prometheus() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core
    except ImportError:  # pragma: no cover - the metrics extra installs it
        raise ConfigError(
            "metrics: needs prometheus-client: pip install 'kvactors[metrics]'"
        ) from None
    return prometheus_client


class CacheMetrics:
    """A collector of one cache's figures, registered in ``registry`` (a new
    ``CollectorRegistry`` by default, so several caches never clash)."""

    def __init__(self, registry: Any = None) -> None:
        prom = _prometheus()
        self._core = prom.core
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        self._lock = threading.Lock()  # updates come from the loop, scrapes from a thread
        self._stats: CacheStats | None = None
        self._recent: dict[tuple[str, str], float] = {}
        self._last: tuple[float, dict[tuple[str, str], int]] | None = None
        self.registry.register(self)

    def update(self, stats: CacheStats, now: float | None = None) -> None:
        """Take ``stats`` as the figures to export (and the GB/s since the last update)."""
        now = time.monotonic() if now is None else now
        flows = _flows(stats)
        moved = {key: n for key, (n, _) in flows.items()}
        with self._lock:
            if self._last is not None and now > self._last[0]:
                then, before = self._last
                self._recent = {
                    k: (n - before.get(k, 0)) / (now - then) / 1e9 for k, n in moved.items()
                }
            self._last = (now, moved)
            self._stats = stats

    def describe(self) -> list[Any]:
        return []  # collected on demand: nothing to check at registration

    def collect(self) -> Iterator[Any]:
        with self._lock:
            stats, recent = self._stats, dict(self._recent)
        if stats is None:
            return
        core = self._core
        counter, gauge = core.CounterMetricFamily, core.GaugeMetricFamily
        hits = counter("kvactors_tier_hits", "Keys found in the tier", labels=["tier"])
        misses = counter("kvactors_tier_misses", "Keys not found in the tier", labels=["tier"])
        moved = counter(
            "kvactors_tier_bytes",
            "Bytes moved into / out of the tier",
            labels=["tier", "direction"],
        )
        gbps = gauge("kvactors_tier_gbps", "GB/s while transferring", labels=["tier", "direction"])
        recent_gbps = gauge(
            "kvactors_tier_recent_gbps",
            "GB/s over the wall time between the last two refreshes",
            labels=["tier", "direction"],
        )
        evictions = counter("kvactors_tier_evictions", "Blocks evicted", labels=["tier"])
        failures = counter("kvactors_tier_failures", "Failed jobs", labels=["tier"])
        up = gauge("kvactors_tier_up", "1 when the tier serves", labels=["tier"])
        blocks = gauge("kvactors_tier_blocks", "Slots by state", labels=["tier", "state"])
        remote = getattr(stats, "remote", None)
        for name, m in stats.policy.tiers.items():
            for state in ("used", "free", "pinned"):
                blocks.add_metric([name, state], getattr(m, state))
            if name == "remote" and remote is not None:
                continue  # what the server answered, below (one series per tier)
            hits.add_metric([name], stats.policy.lookup_found.get(name, 0))
            misses.add_metric([name], stats.policy.lookup_missed.get(name, 0))
            evictions.add_metric([name], m.evictions)
        if remote is not None:
            hits.add_metric(["remote"], remote.hits)
            misses.add_metric(["remote"], remote.misses + remote.corrupt)
            evictions.add_metric(["remote"], remote.corrupt)
        failed_tiers = set(stats.policy.failed)
        flows = _flows(stats)
        for name, ts in stats.tiers.items():
            for direction in ("in", "out"):
                nbytes, secs = flows.get((name, direction), (0, 0.0))
                moved.add_metric([name, direction], nbytes)
                gbps.add_metric([name, direction], nbytes / secs / 1e9 if secs else 0.0)
                recent_gbps.add_metric([name, direction], recent.get((name, direction), 0.0))
            failed = ts.failed_jobs
            if name == "remote" and remote is not None:
                failed = max(failed, remote.node_failures)
            failures.add_metric([name], failed)
            up.add_metric([name], 0 if ts.crashed or name in failed_tiers else 1)
        yield from (hits, misses, moved, gbps, recent_gbps, evictions, failures, up, blocks)

        latency = gauge(
            "kvactors_request_latency_seconds", "Request latency", labels=["op", "quantile"]
        )
        requests = counter("kvactors_requests", "Requests measured", labels=["op"])
        for op, lat in stats.latency.items():
            latency.add_metric([op, "0.5"], lat.p50_us / 1e6)
            latency.add_metric([op, "0.99"], lat.p99_us / 1e6)
            requests.add_metric([op], lat.count)
        failed_requests = counter("kvactors_failed_requests", "Failed calls", labels=["op"])
        failed_requests.add_metric(["store"], stats.failed_stores)
        failed_requests.add_metric(["load"], stats.failed_loads)
        dropped = counter(
            "kvactors_dropped_blocks", "Blocks dropped when read, by reason", labels=["reason"]
        )
        dropped.add_metric(["corrupted"], stats.policy.corrupted)
        dropped.add_metric(["missing"], stats.policy.missing)
        yield from (latency, requests, failed_requests, dropped)


def _flows(stats: CacheStats) -> dict[tuple[str, str], tuple[int, float]]:
    """``(tier, "in" | "out") -> (bytes, seconds)`` over every transfer, whichever
    tier actor ran it (transfers are keyed ``"src->dst"``)."""
    flows: dict[tuple[str, str], tuple[int, float]] = {}
    for ts in stats.tiers.values():
        for op, st in ts.transfers.items():
            src, sep, dst = op.partition("->")
            if not sep:
                continue
            for key in ((src, "out"), (dst, "in")):
                n, secs = flows.get(key, (0, 0.0))
                flows[key] = (n + st.bytes, secs + st.seconds)
    return flows


class MetricsEndpoint:
    """A running exporter: ``url`` is where Prometheus scrapes (``/metrics``)."""

    def __init__(self, metrics: CacheMetrics, host: str, port: int) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address
        return f"http://{host}:{self.port}/metrics"


@contextlib.asynccontextmanager
async def serve_metrics(
    kv: KVCache, *, port: int = 0, host: str = "127.0.0.1", interval: float = 1.0
) -> AsyncIterator[MetricsEndpoint]:
    """Serve ``kv``'s metrics on ``host:port`` (``0``: a free port) while the block
    runs, refreshed every ``interval`` seconds (and once at the start, so the
    first scrape has figures). The server stops when the block ends."""
    prom = _prometheus()
    metrics = CacheMetrics()
    metrics.update(await kv.stats())
    try:
        server, thread = prom.start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        # No such address here (a name that does not resolve, another machine's
        # address) is the host's fault; a port in use or not allowed is the port's.
        unknown = isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL
        key = "metrics.host" if unknown else "metrics.port"
        raise ConfigError(f"{key}: cannot listen on {host}:{port}: {exc}") from exc
    endpoint = MetricsEndpoint(metrics, host, server.server_port)
    try:
        async with anyio.create_task_group() as tg:

            async def refresh() -> None:
                while True:
                    await anyio.sleep(interval)
                    with contextlib.suppress(KVActorsError):  # closing: keep the last figures
                        metrics.update(await kv.stats())

            tg.start_soon(refresh)
            try:
                yield endpoint
            finally:
                tg.cancel_scope.cancel()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
