"""The remote tier in the cache, against real servers: engines share blocks through
one server, a dead server leaves the local tiers serving and comes back by itself,
evictions are misses, cancellation storms leave no pin, a cluster loses one node."""

from __future__ import annotations

import random
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import torch

import kvactors
from _redis import redis_cluster, redis_server, server_binary  # noqa: F401
from _served import drain, settled
from kvactors.cli.demo import block_bytes_for
from kvactors.config import Config, GPUConfig, NVMeConfig, RemoteConfig, TierConfig
from kvactors.errors import ActorClosed, BlockNotFoundError, CacheLockedError, RemoteUnavailable
from kvactors.media.local_server import LocalCluster, LocalServer

pytestmark = pytest.mark.anyio

BB = 16 * 1024
CPU = torch.device("cpu")


def config(remote: RemoteConfig, nvme: bool = False, cpu_blocks: int = 16) -> Config:
    return Config(
        block_bytes=BB,
        gpu=GPUConfig(num_blocks=64, device="cpu"),
        cpu=TierConfig(num_blocks=cpu_blocks),
        nvme=NVMeConfig(num_blocks=32, backend="posix") if nvme else None,
        remote=remote,
    )


def data(keys: list[int]) -> torch.Tensor:
    return block_bytes_for(keys, BB, CPU).clone()


async def store_all(kv: kvactors.KVCache, keys: list[int], step: int = 4) -> None:
    for i in range(0, len(keys), step):
        assert await kv.store(keys[i : i + step], data(keys[i : i + step])) is not None


async def seed(cfg: Config, keys: list[int]) -> None:
    """Store ``keys`` through a cache of its own, closed (so on the server) on return."""
    async with kvactors.open(cfg) as kv:
        await store_all(kv, keys)


def server_keys(url: str, keys: list[int], bb: int = BB) -> list[bytes]:
    """The names the remote tier keeps these blocks under on the server."""
    from kvactors.media.remote import RemoteStore

    names = RemoteStore("remote", bb, url=url)
    try:
        return [names.redis_key(k) for k in keys]
    finally:
        names.close()


async def test_a_block_stored_by_one_engine_loads_in_another(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """Write-through: cache A's stores reach the server at once; cache B, with empty
    local tiers, finds them by lookup, loads them byte-exact and promotes them to CPU."""
    remote = RemoteConfig(url=redis_server.url, model="m1")
    keys = list(range(24))
    with anyio.fail_after(30):
        await seed(config(remote), keys)
        async with kvactors.open(config(remote)) as b:
            found = await b.lookup(keys)
            assert found.hits == len(keys)
            assert set(found.tiers) == {"remote"}
            out = torch.zeros(8, BB, dtype=torch.uint8)
            got = await b.load(keys[:8], out)
            assert got.tiers == ["remote"] * 8
            assert torch.equal(out, data(keys[:8]))
            # Promoted: the second load is served by CPU.
            assert (await b.load(keys[:8], out)).tiers == ["cpu"] * 8
            stats = await settled(b)
            assert stats.policy.promoted == 8
            assert stats.remote is not None
            assert stats.remote.hits == 8
            assert stats.tiers["remote"].crashed is None
        # Another model identity sees none of it.
        other = RemoteConfig(url=redis_server.url, model="m2")
        async with kvactors.open(config(other)) as c:
            assert (await c.lookup(keys)).hits == 0


def in_two_processes(url: str, first: int, write_policy: str) -> list[str]:
    """Process A stores 40 blocks from key ``first`` on and closes; then process B,
    with its own cache on the same server, loads them, all from the remote tier,
    byte-exact. Each process's output: A prints how many blocks the remote tier had
    stored before it closed and what closing wrote back, B ``exact 40``."""
    code = textwrap.dedent(
        f"""
        import sys, anyio, torch, kvactors
        from kvactors.cli.demo import block_bytes_for
        from kvactors.config import Config, GPUConfig, RemoteConfig, TierConfig
        cfg = Config(block_bytes={BB}, gpu=GPUConfig(num_blocks=64, device="cpu"),
                     cpu=TierConfig(num_blocks=64), nvme=None,
                     remote=RemoteConfig(url={url!r}, write_policy={write_policy!r}))
        keys = list(range({first}, {first + 40}))
        want = block_bytes_for(keys, {BB}, torch.device("cpu"))
        async def main():
            with anyio.fail_after(60):
                async with kvactors.open(cfg) as kv:
                    if sys.argv[1] == "store":
                        await kv.store(keys, want)
                        print("stored", (await kv.stats()).remote.stored)
                    else:
                        out = torch.zeros_like(want)
                        got = await kv.load(keys, out)
                        assert set(got.tiers) == {{"remote"}}, got.tiers
                        assert torch.equal(out, want)
                        print("exact", len(keys))
                if sys.argv[1] == "store":
                    print("flushed", [(r.tier, r.written, r.failed, r.left, r.error)
                                      for r in kv.flushed])
        anyio.run(main)
        """
    )
    outs = []
    for role in ("store", "load"):
        done = subprocess.run(
            [sys.executable, "-c", code, role], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        outs.append(done.stdout.strip())
    return outs


def test_store_in_process_a_load_in_process_b(redis_server: LocalServer) -> None:  # noqa: F811
    """Two OS processes, each with its own cache, share blocks through one server."""
    assert in_two_processes(redis_server.url, 1000, "write_through")[1] == "exact 40"


async def test_dead_server_leaves_local_tiers_serving_and_reconnects(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """Killed mid-stream: stores and loads of local blocks go on without an error,
    lookups report only local blocks, the tier shows as down; restarted, it is
    used again without being told."""
    remote = RemoteConfig(url=redis_server.url, timeout=0.5, retry_after=0.2)
    keys = list(range(200))
    seen_down = 0
    with anyio.fail_after(60):
        async with kvactors.open(config(remote, cpu_blocks=64)) as kv:
            for step in range(40):
                chunk = keys[step * 4 : step * 4 + 4]
                if step == 10:
                    redis_server.kill()
                if step == 25:
                    redis_server.start()
                    await anyio.sleep(0.25)
                t0 = time.monotonic()
                assert await kv.store(chunk, data(chunk)) is not None
                out = torch.zeros(4, BB, dtype=torch.uint8)
                got = await kv.load(chunk, out)
                assert got.tiers == ["cpu"] * 4
                assert torch.equal(out, data(chunk))
                assert time.monotonic() - t0 < 2.0
                if 10 <= step < 25:
                    stats = await kv.stats()
                    # Down (and tried again every retry_after): seen as failed.
                    if "remote" in stats.policy.failed:
                        seen_down += 1
                    # Nothing beyond the local blocks: the lookup is the local answer.
                    assert (await kv.lookup([*chunk, 10_000])).hits == 4
            assert seen_down > 0
            stats = await kv.stats()
            assert stats.tiers["remote"].crashed is None
            assert "remote" not in stats.policy.failed
            assert stats.remote is not None
            assert stats.remote.node_failures >= 1
        # What was written after the restart is on the server for another engine.
        async with kvactors.open(config(remote)) as other:
            late = keys[30 * 4 : 31 * 4]
            assert (await other.lookup(late)).tiers == ["remote"] * 4


async def test_a_full_load_within_retry_after_is_block_not_found_at_once(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """Failure behaviour, a server that is down: the full load that finds it down
    raises `RemoteUnavailable`; within `retry_after` a full load of another block
    only the server held raises `BlockNotFoundError` at once (no network), and a
    partial one returns nothing; after `retry_after`, with the server back, the
    block loads."""
    remote = RemoteConfig(url=redis_server.url, timeout=1.0, retry_after=1.0)
    keys = list(range(4))
    with anyio.fail_after(30):
        await seed(config(remote), keys)
        async with kvactors.open(config(remote)) as kv:
            assert (await kv.lookup(keys)).tiers == ["remote"] * 4
            redis_server.kill()
            out = torch.zeros(1, BB, dtype=torch.uint8)
            with pytest.raises(RemoteUnavailable):
                await kv.load([0], out)
            t0 = time.monotonic()
            with pytest.raises(BlockNotFoundError):
                await kv.load([1], out)
            assert (await kv.load([2], out, partial=True)).tiers == []
            assert time.monotonic() - t0 < 0.5
            assert (await kv.stats()).policy.failed == ["remote"]
            redis_server.start()
            await seed(config(remote), keys)
            await anyio.sleep(1.0)
            await kv.load([1], out)
            assert torch.equal(out, data([1]))


async def test_a_database_the_server_lacks_is_a_server_that_is_down(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """Failure behaviour: a URL whose database the server refuses (`/99` of 16)
    is a server that is down: a full load of a block only the server could hold
    raises `RemoteUnavailable` naming the reason (not a `TransferError`), stores
    and lookups succeed with the local tiers, and the tier shows as failed."""
    url = redis_server.url.removesuffix("/0") + "/99"
    remote = RemoteConfig(url=url, timeout=1.0, retry_after=30)
    with anyio.fail_after(30):
        async with kvactors.open(config(remote)) as kv:
            with pytest.raises(RemoteUnavailable, match="DB index is out of range"):
                await kv.load([3], torch.zeros(1, BB, dtype=torch.uint8))
            assert (await kv.store([1, 2], data([1, 2]))) is not None
            assert (await kv.lookup([1, 2, 3])).tiers == ["cpu", "cpu"]
            stats = await kv.stats()
            assert stats.policy.failed == ["remote"]
            crashed = stats.tiers["remote"].crashed
            assert crashed is not None
            assert "DB index is out of range" in crashed
            assert stats.remote is not None
            assert stats.remote.down == [url]


async def test_a_cluster_node_named_as_one_server_is_down_saying_so(
    redis_cluster: LocalCluster,  # noqa: F811
) -> None:
    """A cache whose `url` names a cluster node without `cluster = true`: the
    full load that needs the server raises `RemoteUnavailable` saying to set
    `cluster = true`, stores go on in the local tiers, the tier shows as failed."""
    remote = RemoteConfig(url=f"redis://{redis_cluster.nodes[0]}/0", retry_after=30)
    keys = list(range(16))
    with anyio.fail_after(30):
        async with kvactors.open(config(remote)) as kv:
            with pytest.raises(RemoteUnavailable, match="cluster = true"):
                await kv.load(keys, torch.zeros(len(keys), BB, dtype=torch.uint8))
            await store_all(kv, keys)
            assert (await kv.lookup(keys)).tiers == ["cpu"] * len(keys)
            assert (await kv.stats()).policy.failed == ["remote"]


async def test_damaged_values_are_misses_for_the_cache(redis_server: LocalServer) -> None:  # noqa: F811
    """Garbage and truncated values on the server: the load stops before them
    (partial) or reports them missing, never serves their bytes."""
    remote = RemoteConfig(url=redis_server.url)
    keys = list(range(8))
    with anyio.fail_after(30):
        await seed(config(remote), keys)
        client = redis_server.client()
        five, six = server_keys(redis_server.url, [5, 6])
        client.set(five, b"garbage")
        client.set(six, client.get(six)[:100])
        async with kvactors.open(config(remote)) as b:
            events: Any = await b.events()
            with events:
                out = torch.zeros(8, BB, dtype=torch.uint8)
                got = await b.load(keys, out, partial=True)
                assert len(got.tiers) == 5
                assert torch.equal(out[:5], data(keys[:5]))
                assert bool((out[5:] == 0).all())
                stats = await settled(b)
                assert stats.remote is not None
                assert stats.remote.corrupt == 2
                # Damaged values are corrupted blocks, not missing ones ...
                assert stats.policy.corrupted == 2
                assert stats.policy.missing == 0
                seen = drain(events)
                assert sorted(k for e in seen if e.kind == "corrupted" for k in e.keys) == [5, 6]
                assert not [e for e in seen if e.kind == "missing"]
                # ... deleted from the server, so from now on they are missing.
                assert client.exists(five, six) == 0
                with pytest.raises(BlockNotFoundError):
                    await b.load(keys[5:7], torch.zeros(2, BB, dtype=torch.uint8))
                stats = await settled(b)
                assert (stats.policy.corrupted, stats.policy.missing) == (2, 2)
                assert sorted(k for e in drain(events) if e.kind == "missing" for k in e.keys) == [
                    5,
                    6,
                ]


async def test_a_value_copied_from_another_namespace_is_a_corrupted_miss(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """'Keys and values': a value of another namespace (same model, layout and
    block size, same block key) copied under this namespace's key fails its
    checks: the load stops before it, the caller's rows stay untouched, the block
    counts as corrupted and the value is deleted; the value under its own
    namespace still loads in a cache of that namespace."""
    from kvactors.media.remote import RemoteStore

    keys = list(range(4))
    ours, theirs = (RemoteConfig(url=redis_server.url, namespace=n) for n in ("ours", "theirs"))
    with anyio.fail_after(30):
        await seed(config(ours), keys)
        # the other namespace holds other bytes under the same block keys
        async with kvactors.open(config(theirs)) as kv:
            assert await kv.store(keys, data([k + 100 for k in keys])) is not None
        names = [
            RemoteStore("remote", BB, url=redis_server.url, namespace=n) for n in ("ours", "theirs")
        ]
        try:
            here, there = (s.redis_key(2) for s in names)
        finally:
            for store in names:
                store.close()
        assert here != there
        client = redis_server.client()
        client.set(here, client.get(there))
        async with kvactors.open(config(ours)) as kv:
            out = torch.full((4, BB), 7, dtype=torch.uint8)
            got = await kv.load(keys, out, partial=True)
            assert len(got.tiers) == 2
            assert torch.equal(out[:2], data(keys[:2]))
            assert bool((out[2:] == 7).all())
            stats = await settled(kv)
            assert stats.remote is not None
            assert stats.remote.corrupt == 1
            assert stats.policy.corrupted == 1
            assert client.exists(here) == 0
        async with kvactors.open(config(theirs)) as kv:
            out = torch.zeros(1, BB, dtype=torch.uint8)
            await kv.load([2], out)
            assert torch.equal(out, data([102]))


async def test_values_a_cache_wrote_under_ttl_expire_and_are_then_missing(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """`ttl`: the cache writes each value with `PX`; once expired, a load of it in
    another cache is a miss (a partial load returns nothing, a full one raises
    `BlockNotFoundError`), counted as missing, never as corrupted."""
    keys = [b"t0", b"t1", b"t2"]
    remote = RemoteConfig(url=redis_server.url, ttl=0.4, namespace="ttl")
    with anyio.fail_after(30):
        async with kvactors.open(config(remote)) as a:
            assert await a.store(keys, data([0, 1, 2])) is not None
        client = redis_server.client()
        from kvactors.media.remote import RemoteStore

        names = RemoteStore("remote", BB, url=redis_server.url, namespace="ttl")
        try:
            rkeys = [names.redis_key(k) for k in keys]
        finally:
            names.close()
        assert all(0 < client.pttl(k) <= 400 for k in rkeys)
        while client.exists(*rkeys):
            await anyio.sleep(0.05)
        async with kvactors.open(config(remote)) as b:
            out = torch.full((3, BB), 7, dtype=torch.uint8)
            assert (await b.load(keys, out, partial=True)).tiers == []
            with pytest.raises(BlockNotFoundError):
                await b.load(keys[1:], out[:2])
            assert bool((out == 7).all())
            stats = await settled(b)
            assert stats.policy.corrupted == 0
            assert stats.policy.missing >= 1
            assert stats.remote is not None
            assert stats.remote.corrupt == 0
            assert stats.remote.misses >= 2


@pytest.mark.parametrize("field", ["layout", "model"])
async def test_caches_of_another_layout_or_model_never_share_blocks(
    redis_server: LocalServer,  # noqa: F811
    field: str,
) -> None:
    """'Keys and values': two caches on one server and namespace whose `layout`
    (or `model`) differ never read each other's blocks: the other's lookup finds
    none and its load misses them as absent (other keys, not damaged values),
    while a cache of the first identity loads them."""
    keys = list(range(4))
    first = RemoteConfig(url=redis_server.url, **{field: "a"})
    other = RemoteConfig(url=redis_server.url, **{field: "b"})
    with anyio.fail_after(30):
        await seed(config(first), keys)
        async with kvactors.open(config(other)) as b:
            assert (await b.lookup(keys)).hits == 0
            out = torch.zeros(4, BB, dtype=torch.uint8)
            assert (await b.load(keys, out, partial=True)).tiers == []
            stats = await settled(b)
            assert stats.remote is not None
            assert stats.remote.corrupt == 0
            assert stats.remote.hits == 0
        async with kvactors.open(config(first)) as a:
            assert (await a.lookup(keys)).tiers == ["remote"] * 4
            await a.load(keys, out)
            assert torch.equal(out, data(keys))


async def test_a_damaged_value_read_into_a_cpu_slot_is_never_served(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """A promotion reads each value straight into its new CPU slot and checks it
    there. A value whose payload fails its checksum is a miss: the caller's rows
    are not written, the block is not in CPU, its slot is free again, and what
    landed there is never loaded (the slot's next block loads exact)."""
    remote = RemoteConfig(url=redis_server.url)
    keys = list(range(4))
    with anyio.fail_after(30):
        await seed(config(remote), keys)
        client = redis_server.client()
        (two,) = server_keys(redis_server.url, [2])
        value = bytearray(client.get(two))
        value[-1] ^= 0x01  # the header is fine: the payload lands in the slot
        client.set(two, bytes(value))
        async with kvactors.open(config(remote, cpu_blocks=4)) as b:
            out = torch.full((4, BB), 9, dtype=torch.uint8)
            got = await b.load(keys, out, partial=True)
            assert len(got.tiers) == 2  # the run before the damaged block
            assert torch.equal(out[:2], data(keys[:2]))
            assert bool((out[2:] == 9).all())  # neither the damaged block nor the one after
            stats = await settled(b)
            cpu = stats.policy.tiers["cpu"]
            # Blocks 0, 1 and 3 arrived and stay promoted; block 2's slot is free.
            assert (cpu.used, cpu.free, cpu.pinned) == (3, 1, 0)
            found = await b.lookup(keys)
            assert found.hits == 2
            assert found.tiers[:2] == ["cpu", "cpu"]
            with pytest.raises(BlockNotFoundError):
                await b.load([2], torch.zeros(1, BB, dtype=torch.uint8))
            # The freed slot takes the next block, which loads exact.
            await b.store([10], data([10]))
            again = torch.zeros(1, BB, dtype=torch.uint8)
            assert (await b.load([10], again)).tiers == ["cpu"]
            assert torch.equal(again, data([10]))
            await settled(b)


async def test_maxmemory_reached_is_misses_not_errors() -> None:
    """A server much smaller than what is stored evicts: no caller sees an error,
    later lookups and loads find fewer blocks, and whatever is found is exact."""
    bb = 256 * 1024
    cfg = Config(
        block_bytes=bb,
        gpu=GPUConfig(num_blocks=8, device="cpu"),
        cpu=TierConfig(num_blocks=8),
        nvme=None,
        remote=RemoteConfig(url="redis://127.0.0.1:1/0"),
    )
    keys = list(range(48))  # 12 MiB into 3 MiB
    with LocalServer(binary=server_binary(), maxmemory=3 * 2**20) as server:
        cfg = cfg.replace(remote={"url": server.url})
        with anyio.fail_after(60):
            async with kvactors.open(cfg) as a:
                for i in range(0, len(keys), 4):
                    chunk = keys[i : i + 4]
                    assert await a.store(chunk, block_bytes_for(chunk, bb, CPU)) is not None
            async with kvactors.open(cfg) as b:
                present = [k for k in keys if (await b.lookup([k])).hits == 1]
                assert 0 < len(present) < len(keys)
                for k in keys:
                    out = torch.zeros(1, bb, dtype=torch.uint8)
                    got = await b.load([k], out, partial=True)
                    if got.tiers:
                        assert torch.equal(out, block_bytes_for([k], bb, CPU))


async def test_blocks_the_server_evicted_are_missing_not_corrupted() -> None:
    """``maxmemory`` reached: the server evicts some blocks. A cache that loads
    every key without a lookup first (the read itself finds out) counts the
    absent ones as ``missing`` (events of that kind), none as ``corrupted``;
    nothing is written into the destination of a block that missed."""
    bb = 256 * 1024
    keys = list(range(48))  # 12 MiB into 3 MiB
    with LocalServer(binary=server_binary(), maxmemory=3 * 2**20) as server:
        cfg = Config(
            block_bytes=bb,
            gpu=GPUConfig(num_blocks=8, device="cpu"),
            cpu=TierConfig(num_blocks=64),
            nvme=None,
            remote=RemoteConfig(url=server.url),
        )
        with anyio.fail_after(60):
            async with kvactors.open(cfg) as a:
                for i in range(0, len(keys), 4):
                    chunk = keys[i : i + 4]
                    assert await a.store(chunk, block_bytes_for(chunk, bb, CPU)) is not None
            client = server.client()
            names = server_keys(server.url, keys, bb)
            absent = [k for k, name in zip(keys, names) if not client.exists(name)]
            assert 0 < len(absent) < len(keys)
            async with kvactors.open(cfg) as b:
                events: Any = await b.events()
                found = 0
                for k in keys:
                    out = torch.zeros(1, bb, dtype=torch.uint8)
                    got = await b.load([k], out, partial=True)
                    if got.tiers:
                        found += 1
                        assert torch.equal(out, block_bytes_for([k], bb, CPU))
                    else:
                        assert k in absent
                        assert bool((out == 0).all())
                assert found == len(keys) - len(absent)
                stats = await settled(b)
                assert stats.policy.missing == len(absent)
                assert stats.policy.corrupted == 0
                assert stats.remote is not None
                assert stats.remote.corrupt == 0
                with events:
                    seen = drain(events)
                assert sorted(k for e in seen if e.kind == "missing" for k in e.keys) == absent
                assert not [e for e in seen if e.kind == "corrupted"]


async def test_a_partial_load_over_an_evicted_block_keeps_the_run_before_it(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """One block of a run gone from the server (deleted, as an eviction does): a
    partial load returns the blocks before it byte-exact, each read from the
    server once and kept promoted in CPU; the gone one is missing, not corrupted."""
    remote = RemoteConfig(url=redis_server.url)
    keys = list(range(8))
    with anyio.fail_after(30):
        await seed(config(remote), keys)
        assert redis_server.client().delete(*server_keys(redis_server.url, [3])) == 1
        async with kvactors.open(config(remote)) as b:
            out = torch.zeros(8, BB, dtype=torch.uint8)
            got = await b.load(keys, out, partial=True)
            assert len(got.tiers) == 3  # (from CPU: promoted by the read that found the gap)
            assert torch.equal(out[:3], data(keys[:3]))
            assert bool((out[3:] == 0).all())
            assert (await b.lookup(keys[:3])).tiers == ["cpu"] * 3
            stats = await settled(b)
            assert stats.remote is not None
            assert stats.remote.hits == 7  # one read of the whole run, none again
            assert stats.remote.misses == 1
            assert (stats.policy.missing, stats.policy.corrupted) == (1, 0)


async def storm_then_check(
    kv: kvactors.KVCache, churn: Any, clients: int, keys: list[int], bb: int
) -> None:
    """Three waves of ``clients`` cancelled calls (``churn(i)``); then no block is
    pinned or half written, every tier's slots add up, and whatever is served now
    is exact, from whichever tier."""
    for _ in range(3):
        async with anyio.create_task_group() as tg:
            for i in range(clients):
                tg.start_soon(churn, i)
    stats = await settled(kv)
    for tier in stats.policy.tiers.values():
        assert tier.pinned == tier.being_written == 0
        assert tier.used + tier.free == tier.capacity
    for k in keys:
        out = torch.zeros(1, bb, dtype=torch.uint8)
        if (await kv.load([k], out, partial=True)).tiers:
            assert torch.equal(out, block_bytes_for([k], bb, CPU))


@pytest.mark.parametrize("policy", ["write_through", "on_demotion"])
async def test_cancellation_storm_with_the_remote_tier_leaves_no_pin(
    redis_server: LocalServer,  # noqa: F811
    policy: str,
) -> None:
    remote = RemoteConfig(url=redis_server.url, write_policy=policy)  # type: ignore[arg-type]
    rng = random.Random(7)
    keys = list(range(60))
    with anyio.fail_after(60):
        async with kvactors.open(config(remote)) as seed:
            await store_all(seed, keys[:30])
        async with kvactors.open(config(remote, nvme=True, cpu_blocks=8)) as kv:
            gpu: Any = kv.gpu_pool
            gpu.write_rows(list(range(60)), data(keys))

            async def churn(i: int) -> None:
                with anyio.move_on_after(rng.choice([0, 0.0005, 0.002, 0.01])):
                    base = rng.randrange(0, 56)
                    chunk = keys[base : base + 3]
                    if i % 3 == 0:
                        await kv.store(chunk, chunk)
                    elif i % 3 == 1:
                        await kv.load(chunk, [60, 61, 62] if i % 2 else [63, 62, 61], partial=True)
                    else:
                        kv.prefetch(chunk)
                        await anyio.lowlevel.checkpoint()

            await storm_then_check(kv, churn, 40, keys, BB)
            await settled(kv)


async def test_a_remote_load_is_one_job_promoting_and_copying_out(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """Blocks read from the server are promoted into CPU and copied to the caller in
    the same job of the remote tier (one thread hop); blocks already in CPU are
    copied by the CPU tier. Mixed in one request, into a tensor and into GPU-pool
    slots, every block lands byte-exact where the caller asked."""
    remote = RemoteConfig(url=redis_server.url)
    keys = list(range(10))
    with anyio.fail_after(30):
        await seed(config(remote), keys)
        async with kvactors.open(config(remote)) as b:
            out = torch.zeros(4, BB, dtype=torch.uint8)
            await b.load(keys[:4], out)  # now in CPU
            before = await b.stats()
            order = [4, 0, 5, 1, 6, 2, 7, 3, 8, 9]
            out = torch.zeros(len(order), BB, dtype=torch.uint8)
            got = await b.load(order, out)
            assert got.tiers == ["remote", "cpu"] * 4 + ["remote"] * 2
            assert torch.equal(out, data(order))
            stats = await b.stats()
            ops = stats.tiers["remote"].transfers
            old = before.tiers["remote"].transfers
            assert ops["remote->cpu"].jobs - old["remote->cpu"].jobs == 1
            assert ops["cpu->tensor"].jobs - old["cpu->tensor"].jobs == 1
            assert ops["cpu->tensor"].bytes - old["cpu->tensor"].bytes == 6 * BB
            assert "cpu->tensor" not in before.tiers["cpu"].transfers  # all promoted
            assert stats.tiers["cpu"].transfers["cpu->tensor"].bytes == 4 * BB
            # Into slots of the GPU pool, in an order of their own.
            more = [12, 1, 10, 11]
        await seed(config(remote), [10, 11, 12])
        async with kvactors.open(config(remote)) as b:
            await b.load([1], torch.zeros(1, BB, dtype=torch.uint8))
            slots = [40, 3, 17, 18]
            got = await b.load(more, slots)
            assert got.tiers == ["remote", "cpu", "remote", "remote"]
            assert torch.equal(b.gpu_pool.rows(slots), data(more))
            assert "cpu->gpu" in (await b.stats()).tiers["remote"].transfers
            await settled(b)


BIG = 256 * 1024  # eight blocks are a 2 MiB store: over OVERLAP_BYTES


def big_config(remote: RemoteConfig, cpu_blocks: int = 32) -> Config:
    return Config(
        block_bytes=BIG,
        gpu=GPUConfig(num_blocks=32, device="cpu"),
        cpu=TierConfig(num_blocks=cpu_blocks),
        nvme=None,
        remote=remote,
    )


async def test_a_large_store_writes_through_from_the_request_rows_beside_the_copy(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """A store of at least OVERLAP_BYTES from host memory sends the request's own rows
    to the server while the CPU tier copies them (``tensor->remote`` /
    ``gpu->remote``, never ``cpu->remote``), also when some of its keys are already
    in CPU (the positions of the new ones only); another cache loads every block
    byte-exact, and a small store still writes through from its CPU slots."""
    from kvactors.cache.executor import OVERLAP_BYTES

    assert 8 * BIG >= OVERLAP_BYTES > 2 * BIG
    remote = RemoteConfig(url=redis_server.url, namespace="overlap")
    first, mixed, pooled = [0, 1, 2], [5, 0, 6, 7, 1, 8, 9, 10, 11, 12], list(range(20, 28))
    with anyio.fail_after(60):
        async with kvactors.open(big_config(remote)) as a:
            await a.store(first, block_bytes_for(first, BIG, CPU).clone())
            ops = (await a.stats()).tiers["remote"].transfers
            assert set(ops) == {"cpu->remote"}  # under OVERLAP_BYTES: from the CPU slots
            await a.store(mixed, block_bytes_for(mixed, BIG, CPU).clone())
            gpu: Any = a.gpu_pool
            slots = [5, 2, 7, 0, 3, 6, 1, 4]
            gpu.write_rows(slots, block_bytes_for(pooled, BIG, CPU))
            await a.store(pooled, slots)
            stats = await settled(a)
            ops = stats.tiers["remote"].transfers
            assert ops["tensor->remote"].bytes == 8 * BIG  # the new keys of ``mixed``
            assert ops["gpu->remote"].bytes == 8 * BIG
            assert ops["cpu->remote"].bytes == 3 * BIG
            assert stats.tiers["cpu"].transfers["tensor->cpu"].bytes == 11 * BIG
        async with kvactors.open(big_config(remote)) as b:
            every = list(dict.fromkeys(first + mixed + pooled))
            out = torch.zeros(len(every), BIG, dtype=torch.uint8)
            got = await b.load(every, out)
            assert got.tiers == ["remote"] * len(every)
            assert torch.equal(out, block_bytes_for(every, BIG, CPU))
            await settled(b)


async def test_cancelled_large_stores_leave_no_pin_and_serve_exact_bytes(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """Large stores (write-through beside the copy) cancelled at random moments, with
    loads of the same keys: no pin or block being written is left, and whatever
    the cache or a second cache serves afterwards is byte-exact."""
    remote = RemoteConfig(url=redis_server.url, namespace="storm")
    rng = random.Random(11)
    keys = list(range(40))
    with anyio.fail_after(120):
        async with kvactors.open(big_config(remote, cpu_blocks=16)) as kv:

            async def churn(i: int) -> None:
                with anyio.move_on_after(rng.choice([0, 0.0005, 0.002, 0.01, 0.05])):
                    base = rng.randrange(0, 32)
                    chunk = keys[base : base + 8]
                    if i % 2 == 0:
                        await kv.store(chunk, block_bytes_for(chunk, BIG, CPU).clone())
                    else:
                        out = torch.zeros(len(chunk), BIG, dtype=torch.uint8)
                        await kv.load(chunk, out, partial=True)

            await storm_then_check(kv, churn, 16, keys, BIG)
        async with kvactors.open(big_config(remote)) as other:
            for k in keys:
                out = torch.zeros(1, BIG, dtype=torch.uint8)
                if (await other.load([k], out, partial=True)).tiers:
                    assert torch.equal(out, block_bytes_for([k], BIG, CPU))
            await settled(other)


def connections(server: LocalServer) -> int:
    """Client connections the server holds now, the asking one excluded."""
    client = server.client()
    try:
        return int(client.info("clients")["connected_clients"]) - 1
    finally:
        client.close()


@pytest.mark.parametrize("threads", [1, 3])
async def test_the_thread_limit_bounds_the_calls_in_flight_to_the_server(
    redis_server: LocalServer,  # noqa: F811
    threads: int,
) -> None:
    """``remote.threads``: however many requests reach the remote tier at once, at
    most that many of its calls are in flight, so it never holds more connections
    to the server (each worker thread takes one from the pool and gives it back)."""
    remote = RemoteConfig(url=redis_server.url, namespace="limit", threads=threads)
    keys = list(range(48))
    with anyio.fail_after(60):
        await seed(config(remote, cpu_blocks=64), keys)
        assert connections(redis_server) == 0
        async with kvactors.open(config(remote, cpu_blocks=64)) as b:

            async def one(i: int) -> None:
                chunk = keys[i * 4 : i * 4 + 4]
                assert (await b.lookup(chunk)).hits == 4
                out = torch.zeros(4, BB, dtype=torch.uint8)
                assert (await b.load(chunk, out)).tiers == ["remote"] * 4
                assert torch.equal(out, data(chunk))

            async with anyio.create_task_group() as tg:
                for i in range(12):
                    tg.start_soon(one, i)
            held = connections(redis_server)
            assert 1 <= held <= threads
            assert (await settled(b)).remote.hits == 48  # type: ignore[union-attr]


async def test_engines_share_one_server_while_each_nvme_directory_stays_locked(
    redis_server: LocalServer,  # noqa: F811
    tmp_path: Any,
) -> None:
    """Sharing a server does not share an NVMe directory: a second cache naming the
    directory a first one holds fails with CacheLockedError, while a cache with a
    directory of its own on the same server loads the first one's blocks."""
    remote = RemoteConfig(url=redis_server.url, namespace="lock")

    def with_nvme(directory: str) -> Config:
        return config(remote).replace(
            nvme=NVMeConfig(num_blocks=32, backend="posix", directory=directory)
        )

    keys = list(range(8))
    with anyio.fail_after(60):
        async with kvactors.open(with_nvme(str(tmp_path / "a"))) as a:
            await store_all(a, keys)
            with pytest.raises(CacheLockedError):
                async with kvactors.open(with_nvme(str(tmp_path / "a"))):
                    pass
            async with kvactors.open(with_nvme(str(tmp_path / "b"))) as b:
                out = torch.zeros(len(keys), BB, dtype=torch.uint8)
                assert (await b.load(keys, out)).tiers == ["remote"] * len(keys)
                assert torch.equal(out, data(keys))
                await settled(b)


def calls(server: LocalServer) -> dict[str, int]:
    """Commands the server ran since the last ``CONFIG RESETSTAT``, by name."""
    stats = server.client().info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def test_loads_ask_nothing_first_and_lookups_ask_in_one_batch(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """A load of blocks only the server holds sends one ``GET`` per block and no
    ``EXISTS``; a miss costs the same single read. A lookup asks ``EXISTS`` of the
    keys the local tiers miss, and reads nothing."""
    remote = RemoteConfig(url=redis_server.url)
    keys = list(range(12))
    with anyio.fail_after(30):
        await seed(config(remote), keys[:8])
        async with kvactors.open(config(remote)) as b:
            redis_server.client().config_resetstat()
            out = torch.zeros(4, BB, dtype=torch.uint8)
            assert (await b.load(keys[:4], out)).tiers == ["remote"] * 4
            assert torch.equal(out, data(keys[:4]))
            seen = calls(redis_server)
            assert seen.get("get") == 4
            assert "exists" not in seen
            # A miss: one GET, nothing asked before it.
            assert (await b.load([10], out[:1], partial=True)).tiers == []
            assert calls(redis_server).get("get") == 5
            redis_server.client().config_resetstat()
            found = await b.lookup(keys)  # 0-3 in CPU now: 8 keys asked
            assert found.tiers == ["cpu"] * 4 + ["remote"] * 4
            seen = calls(redis_server)
            assert seen.get("exists") == 8
            assert "get" not in seen
            await settled(b)


async def test_a_lookup_or_load_of_more_blocks_than_the_remote_tracks_gets_the_leading_ones(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """`num_blocks`: the blocks of the server the cache keeps track of. A lookup
    of 32 blocks the server holds, by a cache whose remote tier tracks 8, finds
    the leading 8 (not none), and a partial load returns those 8 byte-exact; a
    full load of all 32 raises `BlockNotFoundError` (see Limits)."""
    remote = RemoteConfig(url=redis_server.url, num_blocks=8)
    keys = list(range(32))
    with anyio.fail_after(30):
        await seed(config(remote, cpu_blocks=64), keys)  # 4 blocks a store
        assert redis_server.client().dbsize() == len(keys)
        async with kvactors.open(config(remote, cpu_blocks=64)) as kv:
            found = await kv.lookup(keys)
            assert found.hits == 8
            assert found.tiers == ["remote"] * 8
        async with kvactors.open(config(remote, cpu_blocks=64)) as kv:
            out = torch.zeros(len(keys), BB, dtype=torch.uint8)
            got = await kv.load(keys, out, partial=True)
            assert got.tiers == ["remote"] * 8
            assert torch.equal(out[:8], data(keys[:8]))
            assert not out[8:].any()
        async with kvactors.open(config(remote, cpu_blocks=64)) as kv:
            with pytest.raises(BlockNotFoundError):
                await kv.load(keys, torch.zeros(len(keys), BB, dtype=torch.uint8))


@pytest.mark.parametrize("write_policy", ["write_through", "on_demotion"])
async def test_more_blocks_at_once_than_the_remote_tracks_still_reach_the_server(
    redis_server: LocalServer,  # noqa: F811
    write_policy: str,
) -> None:
    """A store of 32 blocks at once (`write_through`), or a store evicting 32
    blocks from CPU at once (`on_demotion`), into a remote tier that tracks 16:
    the leading 16 are written to the server (not none of them), and another
    engine loads them byte-exact."""
    remote = RemoteConfig(url=redis_server.url, num_blocks=16, write_policy=write_policy)
    first, second = list(range(32)), list(range(100, 132))
    with anyio.fail_after(30):
        async with kvactors.open(config(remote, cpu_blocks=32)) as kv:
            assert await kv.store(first, data(first)) is not None
            if write_policy == "on_demotion":
                assert redis_server.client().dbsize() == 0
                assert await kv.store(second, data(second)) is not None  # evicts all 32
            stats = await settled(kv)
            assert stats.remote is not None
            assert stats.remote.stored == 16
        async with kvactors.open(config(RemoteConfig(url=redis_server.url))) as other:
            out = torch.zeros(16, BB, dtype=torch.uint8)
            assert (await other.load(first[:16], out)).tiers == ["remote"] * 16
            assert torch.equal(out, data(first[:16]))


async def test_blocks_the_remote_tier_forgets_stay_on_the_server(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """``remote.num_blocks`` bounds what one cache tracks: blocks beyond it are
    forgotten by that cache, not deleted, so another engine still loads them."""
    remote = RemoteConfig(url=redis_server.url, num_blocks=8)
    keys = list(range(24))
    with anyio.fail_after(30):
        async with kvactors.open(config(remote)) as a:
            await store_all(a, keys)
            assert (await a.stats()).policy.tiers["remote"].used <= 8
        assert redis_server.client().exists(*server_keys(redis_server.url, keys)) == len(keys)
        async with kvactors.open(config(remote)) as b:
            out = torch.zeros(4, BB, dtype=torch.uint8)
            assert (await b.load(keys[:4], out)).tiers == ["remote"] * 4
            assert torch.equal(out, data(keys[:4]))


async def test_a_hung_server_blocks_no_event_loop_and_no_buffer_after_cancel(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """The server stops answering (SIGSTOP) during a load: the event loop keeps
    running other tasks meanwhile (the client call blocks a worker thread), a
    cancelled load returns once that call has given up, and nothing writes into
    its destination afterwards, not even when the server answers again."""
    remote = RemoteConfig(url=redis_server.url, timeout=0.5, retry_after=0.2)
    keys = list(range(4))
    with anyio.fail_after(30):
        await seed(config(remote), keys)
        async with kvactors.open(config(remote)) as b:
            assert redis_server.proc is not None
            redis_server.proc.send_signal(signal.SIGSTOP)
            ticks = 0
            out = torch.zeros(4, BB, dtype=torch.uint8)
            try:
                async with anyio.create_task_group() as tg:

                    async def tick() -> None:
                        nonlocal ticks
                        while True:
                            await anyio.sleep(0.01)
                            ticks += 1

                    tg.start_soon(tick)
                    t0 = time.monotonic()
                    with anyio.move_on_after(0.1):
                        # Cancelled at 0.1 s; the read gives up at its 0.5 s timeout
                        # (then the call returns cancelled, or with what the local
                        # tiers hold: nothing).
                        got = await b.load(keys, out, partial=True)
                        assert got.tiers == []
                    took = time.monotonic() - t0
                    tg.cancel_scope.cancel()
                assert 0.4 < took < 2.0
                assert ticks >= 10  # the loop ran on while the client call blocked
                snapshot = out.clone()
                # The CPU slots the read was landing in were released only once
                # the worker thread had given up: nothing pinned, nothing promoted.
                cpu = (await b.stats()).policy.tiers["cpu"]
                assert (cpu.pinned, cpu.being_written, cpu.used) == (0, 0, 0)
            finally:
                redis_server.proc.send_signal(signal.SIGCONT)
            await anyio.sleep(0.3)
            assert torch.equal(out, snapshot)
            await settled(b)
            # Back: the next load reads the blocks (after retry_after).
            await anyio.sleep(0.25)
            again = torch.zeros(4, BB, dtype=torch.uint8)
            assert (await b.load(keys, again)).tiers == ["remote"] * 4
            assert torch.equal(again, data(keys))


async def load_cancelled_while_stopped(
    server: LocalServer, kv: kvactors.KVCache, keys: list[int], out: torch.Tensor
) -> float:
    """Stop the server (SIGSTOP), start ``kv.load(keys, out, partial=True)``, cancel
    it after 0.1 s and let the server answer again at 0.3 s; the seconds the
    cancelled call took to return."""
    assert server.proc is not None
    proc = server.proc
    proc.send_signal(signal.SIGSTOP)
    try:
        async with anyio.create_task_group() as tg:

            async def resume() -> None:
                await anyio.sleep(0.3)
                proc.send_signal(signal.SIGCONT)

            tg.start_soon(resume)
            t0 = time.monotonic()
            with anyio.move_on_after(0.1):
                await kv.load(keys, out, partial=True)
            return time.monotonic() - t0
    finally:
        proc.send_signal(signal.SIGCONT)


async def assert_cancelled_load_left_nothing(
    server: LocalServer, kv: kvactors.KVCache, keys: list[int], out: torch.Tensor
) -> None:
    """A load cancelled while the server is stopped returns once the worker
    thread's read (and any copy out) is over, leaves nothing pinned or being
    written, and its destination is not written after it returned."""
    took = await load_cancelled_while_stopped(server, kv, keys, out)
    assert 0.25 < took < 2.0
    snapshot = out.clone()
    stats = await kv.stats()
    for tier in stats.policy.tiers.values():
        assert tier.pinned == tier.being_written == 0
        assert tier.used + tier.free == tier.capacity
    await anyio.sleep(0.2)
    assert torch.equal(out, snapshot)


async def test_a_load_cancelled_while_its_read_lands_in_cpu_slots_leaves_no_pin(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """The server stalls (SIGSTOP) and answers again before the read's timeout,
    after the load was cancelled: the cancelled call returns once the worker
    thread has finished reading into the CPU slots, nothing is pinned or half
    written afterwards, its destination is not written after it returned, and
    whatever the cache serves from then on is exact."""
    remote = RemoteConfig(url=redis_server.url, timeout=2.0)
    keys = list(range(8))
    with anyio.fail_after(30):
        await seed(config(remote), keys)
        async with kvactors.open(config(remote)) as b:
            out = torch.zeros(8, BB, dtype=torch.uint8)
            await assert_cancelled_load_left_nothing(redis_server, b, keys, out)
            for k in keys:
                one = torch.zeros(1, BB, dtype=torch.uint8)
                assert (await b.load([k], one)).tiers in (["cpu"], ["remote"])
                assert torch.equal(one, data([k]))
            await settled(b)


HUGE = 512 * 1024  # STREAM_BLOCK_BYTES: eight blocks are a 4 MiB load


def huge(keys: list[int]) -> torch.Tensor:
    return block_bytes_for(keys, HUGE, CPU).clone()


def huge_config(remote: RemoteConfig) -> Config:
    return Config(
        block_bytes=HUGE,
        gpu=GPUConfig(num_blocks=8, device="cpu"),
        cpu=TierConfig(num_blocks=16),
        nvme=None,
        remote=remote,
    )


async def test_a_large_remote_load_copies_blocks_out_while_the_next_arrive(
    redis_server: LocalServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A load of at least twice ``STREAM_COPY_BYTES`` in blocks of at least
    ``STREAM_BLOCK_BYTES`` from the server copies its blocks out to the caller's
    rows as they arrive (the promotion's read and the
    copy out overlap): every row exact. A damaged value ends the run there: the
    rows before it are exact, the rows from it on (the blocks after it arrived
    too) are never written, and those blocks stay promoted in CPU."""
    from kvactors.cache import tier_actor

    calls: list[int] = []
    real = tier_actor._streamed

    def spy(*args: Any) -> float:
        calls.append(len(args[2]))
        return real(*args)

    monkeypatch.setattr(tier_actor, "_streamed", spy)
    remote = RemoteConfig(url=redis_server.url)
    keys = list(range(8))  # 4 MiB
    with anyio.fail_after(30):
        async with kvactors.open(huge_config(remote)) as a:
            await a.store(keys, huge(keys))
        async with kvactors.open(huge_config(remote)) as b:
            out = torch.full((8, HUGE), 9, dtype=torch.uint8)
            got = await b.load(keys, out)
            assert got.tiers == ["remote"] * 8
            assert torch.equal(out, huge(keys))
            assert calls == [8]
            await settled(b)
        client = redis_server.client()
        from kvactors.media.remote import RemoteStore

        names = RemoteStore("remote", HUGE, url=redis_server.url)
        value = bytearray(client.get(names.redis_key(5)))
        value[-1] ^= 0x01  # lands in its slot, then fails its checksum
        client.set(names.redis_key(5), bytes(value))
        names.close()
        async with kvactors.open(huge_config(remote)) as b:
            out = torch.full((8, HUGE), 9, dtype=torch.uint8)
            got = await b.load(keys, out, partial=True)
            assert len(got.tiers) == 5
            assert torch.equal(out[:5], huge(keys[:5]))
            assert bool((out[5:] == 9).all())
            assert len(calls) == 2
            stats = await settled(b)
            assert stats.policy.tiers["cpu"].used == 7  # all but block 5 arrived, kept
        # Smaller blocks (256 KiB) are read first and copied out after, as before.
        small = list(range(100, 116))  # 4 MiB
        async with kvactors.open(big_config(remote)) as a:
            for i in range(0, 16, 8):
                await a.store(small[i : i + 8], block_bytes_for(small[i : i + 8], BIG, CPU))
        async with kvactors.open(big_config(remote)) as b:
            out = torch.zeros(16, BIG, dtype=torch.uint8)
            assert (await b.load(small, out)).tiers == ["remote"] * 16
            assert torch.equal(out, block_bytes_for(small, BIG, CPU))
            assert len(calls) == 2
            await settled(b)


async def test_a_large_remote_load_cancelled_mid_read_writes_nothing_afterwards(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """The server stalls (SIGSTOP) in the middle of a 4 MiB load whose blocks are
    copied out as they arrive, and answers again after the load was cancelled:
    the call returns once the read and every copy out have ended, its rows are
    not written afterwards, nothing stays pinned, and later loads are exact."""
    remote = RemoteConfig(url=redis_server.url, timeout=2.0)
    keys = list(range(8))
    with anyio.fail_after(30):
        async with kvactors.open(huge_config(remote)) as a:
            await a.store(keys, huge(keys))
        async with kvactors.open(huge_config(remote)) as b:
            out = torch.zeros(8, HUGE, dtype=torch.uint8)
            await assert_cancelled_load_left_nothing(redis_server, b, keys, out)
            again = torch.zeros(8, HUGE, dtype=torch.uint8)
            await b.load(keys, again)
            assert torch.equal(again, huge(keys))
            await settled(b)


async def test_a_tracked_block_the_server_evicted_counts_in_lookup_until_read(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """The documented limit: a block this cache wrote and still tracks, gone from
    the server (evicted), is reported by ``lookup`` (nothing is asked for tracked
    blocks); the load that reads it finds it missing, and later lookups do not."""
    remote = RemoteConfig(url=redis_server.url)
    keys = list(range(24))
    with anyio.fail_after(30):
        async with kvactors.open(config(remote, cpu_blocks=16)) as kv:
            await store_all(kv, keys)  # 0-7 left CPU; the remote tier tracks them
            assert redis_server.client().delete(*server_keys(redis_server.url, [0])) == 1
            assert (await kv.lookup([0, 1])).tiers == ["remote", "remote"]
            out = torch.zeros(2, BB, dtype=torch.uint8)
            assert (await kv.load([0, 1], out, partial=True)).tiers == []
            assert (await kv.lookup([0])).hits == 0
            # Block 1 arrived in the same read: promoted, it is served from CPU.
            assert (await kv.load([1], out[:1])).tiers == ["cpu"]
            assert torch.equal(out[:1], data([1]))
            stats = await settled(kv)
            assert (stats.policy.missing, stats.policy.corrupted) == (1, 0)


async def test_global_write_through_writes_the_remote_at_once_even_on_demotion(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """``write_mode = "write_through"`` writes every stored block to every tier,
    the remote included, whatever its own ``write_policy``: another engine loads
    it while the first cache is still open and holds it in CPU."""
    remote = RemoteConfig(url=redis_server.url, write_policy="on_demotion")
    keys = list(range(4))
    with anyio.fail_after(30):
        async with kvactors.open(config(remote).replace(write_mode="write_through")) as a:
            await store_all(a, keys)
            assert (await a.lookup(keys)).tiers == ["cpu"] * 4
            async with kvactors.open(config(remote)) as b:
                out = torch.zeros(4, BB, dtype=torch.uint8)
                assert (await b.load(keys, out)).tiers == ["remote"] * 4
                assert torch.equal(out, data(keys))
        # Without it, on_demotion leaves them in CPU only until evicted or closed.
        other = list(range(10, 14))
        async with kvactors.open(config(remote)) as a:
            await store_all(a, other)
            async with kvactors.open(config(remote)) as b:
                out = torch.zeros(4, BB, dtype=torch.uint8)
                assert (await b.load(other, out, partial=True)).tiers == []


async def test_prefetch_promotes_remote_blocks_to_cpu(redis_server: LocalServer) -> None:  # noqa: F811
    remote = RemoteConfig(url=redis_server.url)
    keys = list(range(6))
    with anyio.fail_after(30):
        await seed(config(remote), keys)
        async with kvactors.open(config(remote)) as b:
            assert b.prefetch(keys)
            while (await b.stats()).policy.promoted < len(keys):
                await anyio.sleep(0.01)
            found = await b.lookup(keys)
            assert found.tiers == ["cpu"] * len(keys)


async def test_on_demotion_writes_blocks_only_when_they_leave_cpu(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    remote = RemoteConfig(url=redis_server.url, write_policy="on_demotion")
    keys = list(range(24))
    with anyio.fail_after(30):
        async with kvactors.open(config(remote, cpu_blocks=8)) as a:
            await store_all(a, keys[:8])
            assert (await a.stats()).remote.stored == 0  # type: ignore[union-attr]
            await store_all(a, keys[8:])  # evicts the first 16 from CPU
            assert (await a.stats()).remote.stored == 16  # type: ignore[union-attr]
        # Closing wrote back the 8 still in CPU.
        assert [(r.written, r.failed, r.left) for r in a.flushed] == [(8, 0, 0)]
        async with kvactors.open(config(remote)) as b:
            assert (await b.lookup(keys)).hits == 24
            out = torch.zeros(24, BB, dtype=torch.uint8)
            await b.load(keys, out)
            assert torch.equal(out, data(keys))


async def test_on_demotion_with_nvme_writes_blocks_only_when_they_leave_nvme(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """`on_demotion`: "blocks reach the server when evicted from the tier above
    (CPU, or NVMe when configured)": with NVMe in the chain, blocks CPU evicts go
    to NVMe and none to the server; those NVMe evicts reach the server, and
    another engine loads them from there byte-exact."""
    remote = RemoteConfig(url=redis_server.url, write_policy="on_demotion")
    keys = list(range(48))
    with anyio.fail_after(60):
        async with kvactors.open(config(remote, nvme=True, cpu_blocks=8)) as a:
            await store_all(a, keys[:32])  # 24 evicted from CPU: NVMe holds them
            stats = await settled(a)
            assert stats.policy.tiers["nvme"].used == 24
            assert stats.remote is not None
            assert stats.remote.stored == 0
            assert redis_server.client().dbsize() == 0
            await store_all(a, keys[32:])  # 16 more into NVMe (32 slots): 8 leave it
            stats = await settled(a)
            assert stats.policy.tiers["nvme"].used == 32
            assert stats.remote is not None
            assert stats.remote.stored == 8
        async with kvactors.open(config(RemoteConfig(url=redis_server.url))) as b:
            first = keys[:8]  # the least recently used: the first NVMe evicted
            assert (await b.lookup(first)).tiers == ["remote"] * 8
            out = torch.zeros(8, BB, dtype=torch.uint8)
            await b.load(first, out)
            assert torch.equal(out, data(first))


async def test_cluster_tier_loses_one_node_without_wrong_bytes(
    redis_cluster: LocalCluster,  # noqa: F811
) -> None:
    """Through the cache on a 3-node cluster: one node killed mid-run makes its
    blocks misses; every load returns exact bytes or stops short; nothing hangs."""
    remote = RemoteConfig(url=None, nodes=redis_cluster.nodes, timeout=0.5, retry_after=5)
    keys = list(range(60))
    with anyio.fail_after(60):
        await seed(config(remote, cpu_blocks=64), keys)
        async with kvactors.open(config(remote, cpu_blocks=64)) as b:
            assert (await b.lookup(keys)).hits == len(keys)
            redis_cluster.servers[2].kill()
            loaded = missing = 0
            for k in keys:
                out = torch.zeros(1, BB, dtype=torch.uint8)
                t0 = time.monotonic()
                got = await b.load([k], out, partial=True)
                assert time.monotonic() - t0 < 2.0
                if got.tiers:
                    assert torch.equal(out, data([k]))
                    loaded += 1
                else:
                    missing += 1
            assert loaded > 10
            assert missing > 10
            stats = await b.stats()
            assert stats.tiers["remote"].crashed is None  # the tier serves on
            assert stats.remote is not None
            assert stats.remote.down == [redis_cluster.servers[2].node]


def test_demo_with_a_remote_shows_the_remote_tier(
    redis_server: LocalServer,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``kvactors demo --remote URL``: the remote tier is in the title and the table,
    and a second run finds the first run's blocks there."""
    import json

    from kvactors.cli import main

    args = ["demo", "--remote", redis_server.url, "--requests", "60", "--no-nvme"]
    args += ["--cpu-blocks", "64", "--block-kib", "4"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "GPU pool, CPU, remote" in table
    assert "cpu->remote" in table
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["summary"]["hits_remote"] > 0
    assert "remote->cpu" in report["summary"]["moved"]


def test_bench_remote_starts_its_own_server_and_reports_every_figure(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``kvactors bench remote`` with no URL: a throwaway server, store / load GB/s
    against raw redis-py per size (the faster of one call per block and pipelines,
    the winner named), the round trip, the two-engine hit ratios."""
    import json

    from kvactors.cli import main

    server_binary()  # skipped without a server binary
    args = ["bench", "remote", "--sizes", "16", "64", "--mib", "1", "--repeat", "3"]
    args += ["--requests", "60", "--cpu-blocks", "32", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = report["summary"]
    assert summary["url"].startswith("redis://127.0.0.1:")
    for kib in ("16", "64"):
        figures = summary["sizes"][kib]
        for name in ("raw_set", "raw_get", "medium_put", "medium_get", "kv_store", "kv_load"):
            assert figures[f"{name}_gbps"] > 0
        for op, ratio, side in (
            ("set", "store_ratio", "kv_store"),
            ("get", "load_ratio", "kv_load"),
        ):
            # The baseline is the faster of one call per block and pipelines by
            # their median rounds, named, at its best round.
            ways = {mode: figures[f"raw_{op}_{mode}_gbps"] for mode in ("call", "pipeline")}
            assert all(v > 0 for v in ways.values())
            each = figures["rounds_gbps"]
            medians = {mode: statistics.median(each[f"raw_{op}_{mode}"]) for mode in ways}
            won = figures[f"{ratio.split('_')[0]}_baseline"]
            assert medians[won] == max(medians.values())
            assert ways[won] == max(each[f"raw_{op}_{won}"]) == figures[f"raw_{op}_gbps"]
            assert figures[ratio] == pytest.approx(figures[f"{side}_gbps"] / ways[won])
    assert summary["round_trip"]["kv_load_us"] > 0
    sharing = summary["sharing"]
    assert 0 <= sharing["alone"] <= sharing["shared"] <= 1


def test_on_demotion_blocks_still_local_are_written_back_at_close(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """Under ``on_demotion`` process A stores blocks that never leave its CPU tier
    and closes: closing writes them back, so process B loads every one byte-exact."""
    outs = in_two_processes(redis_server.url, 2000, "on_demotion")
    assert outs == ["stored 0\nflushed [('remote', 40, 0, 0, None)]", "exact 40"]


async def test_write_back_at_close_takes_blocks_from_cpu_and_nvme(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """With NVMe between: blocks in CPU and in NVMe at close are written back (each
    once), those already on the server are not written again."""
    remote = RemoteConfig(url=redis_server.url, write_policy="on_demotion")
    keys = list(range(60))
    with anyio.fail_after(60):
        async with kvactors.open(config(remote, nvme=True, cpu_blocks=8)) as a:
            await store_all(a, keys)  # 8 in CPU, 32 in NVMe, 20 demoted to the server
            early = (await a.stats()).remote
            assert early is not None
            assert early.stored == 20
        assert [(r.tier, r.written, r.failed, r.left, r.error) for r in a.flushed] == [
            ("remote", 40, 0, 0, None)
        ]
        async with kvactors.open(config(remote, cpu_blocks=64)) as b:
            out = torch.zeros(len(keys), BB, dtype=torch.uint8)
            got = await b.load(keys, out)
            assert got.tiers == ["remote"] * len(keys)
            assert torch.equal(out, data(keys))
            stats = await b.stats()
            assert stats.remote is not None
            assert stats.remote.hits == len(keys)
        # Everything it holds came from the server: nothing to write back.
        assert [(r.written, r.failed, r.left, r.error) for r in b.flushed] == [(0, 0, 0, None)]


async def test_write_back_at_close_runs_when_the_block_is_cancelled(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """`on_demotion`: closing writes back the blocks still held in CPU "whatever
    ended the `async with` block", a cancellation included: every block is on
    the server afterwards and `kv.flushed` counts them written."""
    remote = RemoteConfig(url=redis_server.url, write_policy="on_demotion")
    keys = list(range(12))
    seen: dict[str, kvactors.KVCache] = {}
    with anyio.fail_after(30):
        with anyio.CancelScope() as scope:
            async with kvactors.open(config(remote)) as kv:
                seen["kv"] = kv
                await store_all(kv, keys)
                assert redis_server.client().dbsize() == 0  # nothing demoted yet
                scope.cancel()
                await anyio.sleep_forever()
        assert scope.cancelled_caught
    assert [(r.tier, r.written, r.failed, r.left) for r in seen["kv"].flushed] == [
        ("remote", len(keys), 0, 0)
    ]
    client = redis_server.client()
    assert all(client.exists(n) for n in server_keys(redis_server.url, keys))
    async with kvactors.open(config(RemoteConfig(url=redis_server.url))) as other:
        out = torch.zeros(len(keys), BB, dtype=torch.uint8)
        assert (await other.load(keys, out)).tiers == ["remote"] * len(keys)
        assert torch.equal(out, data(keys))


@pytest.mark.parametrize("delay", [0.0, 0.001, 0.005, 0.02, 0.1])
async def test_a_cancellation_while_the_cache_opens_or_runs_never_hangs_the_close(
    redis_server: LocalServer,  # noqa: F811
    delay: float,
) -> None:
    """A cancel scope around `kvactors.open` that fires while the actors start (or
    once they run): the block is left within a few seconds, every actor stopped,
    and a cache that opened has written back under `on_demotion`."""
    remote = RemoteConfig(url=redis_server.url, write_policy="on_demotion")
    opened: list[kvactors.KVCache] = []
    with anyio.fail_after(20):
        with anyio.move_on_after(delay):
            async with kvactors.open(config(remote, nvme=True)) as kv:
                opened.append(kv)
                await kv.store([1, 2], data([1, 2]))
                await anyio.sleep_forever()
    for kv in opened:
        assert [(r.tier, r.failed, r.left) for r in kv.flushed] == [("remote", 0, 0)]


async def test_write_back_at_close_with_the_server_down_reports_and_returns(
    redis_server: LocalServer,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server died before close: closing does not hang, nothing raises, and
    the blocks not written are reported (``kv.flushed`` and a warning)."""
    remote = RemoteConfig(
        url=redis_server.url, write_policy="on_demotion", timeout=0.5, retry_after=5.0
    )
    keys = list(range(12))
    with anyio.fail_after(20):
        async with kvactors.open(config(remote)) as kv:
            await store_all(kv, keys)
            redis_server.kill()
            t0 = time.monotonic()
    assert time.monotonic() - t0 < 5.0
    [result] = kv.flushed
    assert result.tier == "remote"
    assert result.written == 0
    assert result.failed + result.left == len(keys)
    assert result.error is not None
    # "a close that did not write everything also logs a warning (logger `kvactors.cache`)"
    assert any(
        r.name == "kvactors.cache" and r.levelname == "WARNING" and "written back" in r.getMessage()
        for r in caplog.records
    )


async def test_write_back_at_close_is_bounded_by_flush_timeout(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """A server that stops answering (SIGSTOP) mid-close: closing returns after
    about ``flush_timeout`` (plus one reply's ``timeout``), reporting what was left."""
    import signal

    remote = RemoteConfig(
        url=redis_server.url, write_policy="on_demotion", timeout=1.0, flush_timeout=0.3
    )
    keys = list(range(16))
    proc = redis_server.proc
    assert proc is not None
    try:
        with anyio.fail_after(20):
            async with kvactors.open(config(remote)) as kv:
                await store_all(kv, keys)
                proc.send_signal(signal.SIGSTOP)
                t0 = time.monotonic()
            elapsed = time.monotonic() - t0
    finally:
        proc.send_signal(signal.SIGCONT)
    assert elapsed < 0.3 + 1.0 + 1.0
    [result] = kv.flushed
    assert result.written == 0
    assert result.failed + result.left == len(keys)
    assert result.error is not None


async def test_write_back_cut_by_flush_timeout_counts_the_batch_in_flight_as_failed(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """A live server and a `flush_timeout` too short for 80 MiB held in CPU and
    NVMe, the block left by an exception: the close returns within
    `flush_timeout` plus one `timeout`, `written + failed + left` is every
    block, the server holds exactly the blocks counted `written` (those of the
    batch cut off, counted `failed`, are not left there), and the error says
    time ran out."""
    bb = 1 << 20
    keys = list(range(80))
    remote = RemoteConfig(
        url=redis_server.url, write_policy="on_demotion", flush_timeout=0.01, timeout=2.0
    )
    cfg = Config(
        block_bytes=bb,
        gpu=GPUConfig(num_blocks=8, device="cpu"),
        cpu=TierConfig(num_blocks=32),
        nvme=NVMeConfig(num_blocks=64, backend="posix"),
        remote=remote,
    )
    seen: dict[str, Any] = {}

    async def store_then_leave() -> None:
        async with kvactors.open(cfg) as kv:
            seen["kv"] = kv
            for i in range(0, len(keys), 8):
                chunk = keys[i : i + 8]
                assert await kv.store(chunk, block_bytes_for(chunk, bb, CPU)) is not None
            assert redis_server.client().dbsize() == 0  # nothing demoted to it yet
            seen["t0"] = time.monotonic()
            raise RuntimeError("leaving")

    with anyio.fail_after(60), pytest.raises(RuntimeError, match="leaving"):
        await store_then_leave()
    assert time.monotonic() - seen["t0"] < 0.01 + 2.0 + 1.0
    [result] = seen["kv"].flushed
    assert result.written + result.failed + result.left == len(keys)
    client = redis_server.client()
    held = [bool(client.exists(n)) for n in server_keys(redis_server.url, keys, bb)]
    assert sum(held) == result.written
    if result.written < len(keys):
        assert result.error == "time ran out after 0.01 s"


async def test_a_full_noeviction_server_fails_remote_writes_not_stores() -> None:
    """Failure behaviour, "the server is full under `noeviction`": every store
    succeeds locally and loads exact from CPU; the remote writes the server
    refused leave their blocks untracked by the remote tier (it tracks no more
    blocks than the server holds), and the tier is not marked down."""
    bb = 256 * 1024
    keys = list(range(64))  # 16 MiB of values into 4 MiB
    with LocalServer(binary=server_binary(), maxmemory=4 * 2**20, policy="noeviction") as server:
        cfg = Config(
            block_bytes=bb,
            gpu=GPUConfig(num_blocks=8, device="cpu"),
            cpu=TierConfig(num_blocks=8),
            nvme=None,
            remote=RemoteConfig(url=server.url),
        )
        with anyio.fail_after(60):
            async with kvactors.open(cfg) as kv:
                for i in range(0, len(keys), 4):
                    chunk = keys[i : i + 4]
                    assert await kv.store(chunk, block_bytes_for(chunk, bb, CPU)) is not None
                    out = torch.zeros(4, bb, dtype=torch.uint8)
                    assert (await kv.load(chunk, out)).tiers == ["cpu"] * 4
                    assert torch.equal(out, block_bytes_for(chunk, bb, CPU))
                stats = await settled(kv)
                client = server.client()
                held = sum(client.exists(n) for n in server_keys(server.url, keys, bb))
                assert 0 < held < len(keys)
                assert 0 < stats.policy.tiers["remote"].used <= held
                assert "remote" not in stats.policy.failed
                assert stats.tiers["remote"].crashed is None


async def test_the_nvme_and_remote_media_refuse_io_once_their_cache_closed(
    redis_server: LocalServer,  # noqa: F811
) -> None:
    """docs/api.md: after the cache closes, ``kv.medium("nvme")`` and
    ``kv.medium("remote")`` raise ActorClosed for reads, writes and drops (they
    raised a bare IndexError / KeyError); the CPU pool's memory stays readable."""
    bb = 4096
    cfg = Config(
        block_bytes=bb,
        gpu=GPUConfig(num_blocks=4, device="cpu"),
        cpu=TierConfig(num_blocks=4),
        nvme=NVMeConfig(num_blocks=8),
        remote=RemoteConfig(url=redis_server.url),
    )
    rows = block_bytes_for([1, 2], bb, CPU)
    with anyio.fail_after(30):
        async with kvactors.open(cfg) as kv:
            assert await kv.store([1, 2], rows) is not None
    out = torch.zeros(1, bb, dtype=torch.uint8)
    for tier in ("nvme", "remote"):
        medium: Any = kv.medium(tier)
        for name, args in (("read_into", ([0], out, [1])), ("write_from", ([0], out, [5]))):
            with pytest.raises(ActorClosed, match="after the store was closed"):
                getattr(medium, name)(*args)
        with pytest.raises(ActorClosed, match="after the store was closed"):
            medium.drop([1])
    assert out.count_nonzero() == 0  # nothing was read into it
    cpu: Any = kv.medium("cpu")
    assert cpu.read_into([0], out, [1]) == []
