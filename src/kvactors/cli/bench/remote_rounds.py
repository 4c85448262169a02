"""The store / load rounds of ``kvactors bench remote``: raw redis-py ``SET`` /
``GET`` of the same bytes (one call per block, and pipelines of about
:data:`RAW_BATCH_BYTES`), ``kv.store`` / ``kv.load`` through two caches, and the
remote medium alone, a moment apart in each round, the three raw / kvactors
sides taking turns at going first.

:mod:`kvactors.cli.bench.remote` (the command, the round trips, the sharing
replay, the table) turns the seconds measured here into figures.
"""

from __future__ import annotations

import gc
import time
import uuid

import anyio
import torch

import kvactors
from kvactors.config import Config, GPUConfig, RemoteConfig, TierConfig
from kvactors.keys import Key
from kvactors.media.remote import RemoteStore

__all__ = ["RAW_BATCH_BYTES", "RAW_MODES", "cache_config", "flush", "measure_rounds"]


def cache_config(url: str, bb: int, n: int, namespace: str, cpu_blocks: int) -> Config:
    """A cache of ``n`` GPU blocks (on the CPU) and ``cpu_blocks`` CPU blocks over
    the remote tier at ``url`` under ``namespace``, no NVMe tier."""
    return Config(
        block_bytes=bb,
        gpu=GPUConfig(num_blocks=max(n, 1), device="cpu"),
        cpu=TierConfig(num_blocks=cpu_blocks),
        nvme=None,
        remote=RemoteConfig(url=url, namespace=namespace),
    )


RAW_BATCH_BYTES = 8 * 2**20
"""Bytes of values one raw redis-py pipeline carries (the ``pipeline`` baseline)."""
RAW_MODES = ("call", "pipeline")
"""The two raw redis-py baselines: one ``SET`` / ``GET`` call per block, or one
pipeline of them per batch of about :data:`RAW_BATCH_BYTES`."""


class _Raw:
    """Raw redis-py ``SET`` / ``GET`` of each block on one client kept open across
    rounds (as an engine keeps its connection), either one call per block
    (``call``) or one ``pipeline(transaction=False)`` per batch of about
    :data:`RAW_BATCH_BYTES` (``pipeline``): the same bytes, the same server."""

    def __init__(self, url: str, rows: torch.Tensor, out: torch.Tensor) -> None:
        import redis

        self.client = redis.Redis.from_url(url)
        self.rows, self.out = rows, out
        n, bb = rows.shape
        self.step = max(1, min(n, RAW_BATCH_BYTES // bb))
        flat = memoryview(rows.numpy()).cast("B")  # type: ignore[arg-type]
        self.views = [flat[i * bb : (i + 1) * bb] for i in range(n)]
        oflat = memoryview(out.numpy()).cast("B")  # type: ignore[arg-type]
        self.dst = [oflat[i * bb : (i + 1) * bb] for i in range(n)]
        self.keys: dict[str, list[bytes]] = {}

    def set(self, mode: str, prefix: bytes) -> float:
        """Seconds of the ``SET``\\ s of every row, under new keys, the ``mode`` way."""
        keys = self.keys[mode] = [prefix + b"%d" % i for i in range(len(self.views))]
        client, views, step = self.client, self.views, self.step
        t0 = time.perf_counter()
        if mode == "call":
            for key, view in zip(keys, views):
                client.set(key, view)
        else:
            for i in range(0, len(keys), step):
                pipe = client.pipeline(transaction=False)
                for key, view in zip(keys[i : i + step], views[i : i + step]):
                    pipe.set(key, view)
                pipe.execute()
        return time.perf_counter() - t0

    def get(self, mode: str) -> float:
        """Seconds of the ``GET``\\ s of what :meth:`set` wrote the ``mode`` way,
        into ``out`` (then checked, zeroed and deleted)."""
        keys = self.keys.pop(mode)
        client, dst, step = self.client, self.dst, self.step
        t0 = time.perf_counter()
        if mode == "call":
            for key, d in zip(keys, dst):
                d[:] = client.get(key)  # type: ignore[assignment]
        else:
            for i in range(0, len(keys), step):
                pipe = client.pipeline(transaction=False)
                for key in keys[i : i + step]:
                    pipe.get(key)
                for d, value in zip(dst[i : i + step], pipe.execute()):
                    d[:] = value
        seconds = time.perf_counter() - t0
        assert torch.equal(self.out, self.rows)
        self.out.zero_()
        client.delete(*keys)
        return seconds

    def close(self) -> None:
        self.client.close()


def _medium(store: RemoteStore, rows: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """Seconds of ``RemoteStore.put`` of ``rows``, then of ``get_into`` into ``out``."""
    keys: list[Key] = list(range(rows.shape[0]))
    t0 = time.perf_counter()
    store.write_from([], rows, keys)
    t1 = time.perf_counter()
    missed = store.read_into([], out, keys)
    t2 = time.perf_counter()
    assert missed == []
    assert torch.equal(out, rows)
    out.zero_()
    store.delete(keys)
    return t1 - t0, t2 - t1


async def measure_rounds(url: str, rows: torch.Tensor, rounds: int) -> dict[str, list[float]]:
    """Seconds of each side in each round: raw ``SET`` both ways and ``kv.store``
    (one cache, writing through to the server), then raw ``GET`` both ways and
    ``kv.load`` of the blocks just stored by a second cache whose local tiers do
    not hold them, then the medium alone, in one run. The three sides (one call
    per block, pipelines, kvactors) take turns at going first: round ``r`` runs
    them in the order rotated by ``r``, stores and loads alike. A first round,
    not measured, brings every side to the state of the later ones (the caches'
    CPU tiers full and evicting, the server's memory grown). The objects the
    process holds before the first round are kept out of the garbage
    collector's scans (``gc.freeze``) until the rounds end. Clients and
    caches stay open across rounds (as an engine's do); each round uses new keys."""
    n, bb = rows.shape
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    cfg = cache_config(url, bb, n, namespace, cpu_blocks=n)
    step = max(1, min(n, (8 * 2**20) // bb))  # requests of about 8 MiB
    out = torch.zeros_like(rows)  # written before, as an engine's buffers are
    seconds: dict[str, list[float]] = {}
    raw = _Raw(url, rows, out)
    medium = RemoteStore("remote", bb, url=url, namespace=namespace + "-m")
    store = RemoteStore("remote", bb, url=url, namespace=namespace)
    run = anyio.to_thread.run_sync
    try:
        async with kvactors.open(cfg) as a, kvactors.open(cfg) as b:
            # Connections made before the first round, on every side.
            warm = [(rounds + 1) * n]
            raw.client.ping()
            await a.store(warm, rows[:1])
            await b.load(warm, out[:1])
            out.zero_()
            store.delete(warm)
            medium.contains(warm)
            # What the process holds now (torch's and the imports' objects) is left
            # out of the collector's scans: a full collection of it took ~40 ms,
            # landing in one measurement of a few ms on whichever side ran then.
            # Collections the sides' own allocations start still run where they do.
            gc.freeze()
            for r in range(rounds + 1):
                # Round 0 is not measured: every side, the caches' CPU tiers (full,
                # evicting, from round 1 on) and the server's memory are then as
                # they are in every later round.
                unmeasured: dict[str, list[float]] = {}
                took = (seconds if r else unmeasured).setdefault
                keys: list[Key] = list(range(r * n, (r + 1) * n))
                # The three sides take turns at going first (round r starts at
                # side r mod 3): none always writes into, or reads from, a
                # server the others have just used.
                sides = ["call", "pipeline", "kv"]
                sides = sides[r % 3 :] + sides[: r % 3]
                for side in sides:
                    if side == "kv":
                        t0 = time.perf_counter()
                        for i in range(0, n, step):
                            await a.store(keys[i : i + step], rows[i : i + step])
                        took("kv_store", []).append(time.perf_counter() - t0)
                    else:
                        prefix = f"{namespace}-raw-{side}-{r}:".encode()
                        took(f"raw_set_{side}", []).append(await run(raw.set, side, prefix))
                for side in sides:
                    if side == "kv":
                        t0 = time.perf_counter()
                        for i in range(0, n, step):
                            got = await b.load(keys[i : i + step], out[i : i + step])
                            assert set(got.tiers) == {"remote"}
                        took("kv_load", []).append(time.perf_counter() - t0)
                        assert torch.equal(out, rows)
                        out.zero_()
                    else:
                        took(f"raw_get_{side}", []).append(await run(raw.get, side))
                store.delete(keys)  # the server never fills up
                put, get = await run(_medium, medium, rows, out)
                took("medium_put", []).append(put)
                took("medium_get", []).append(get)
    finally:
        gc.unfreeze()
        raw.close()
        medium.close()
        store.close()
        flush(url, namespace)
    return seconds


def flush(url: str, namespace: str) -> None:
    """Remove what one repeat wrote (its namespace), so the server never fills up."""
    import redis

    client = redis.Redis.from_url(url)
    for pattern in (f"{namespace}:*", f"{namespace}-*"):
        batch = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(batch), 1000):
            client.delete(*batch[i : i + 1000])
    client.close()
