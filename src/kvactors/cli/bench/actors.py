"""``kvactors bench actors``: the cost of the actor path against the synchronous core.

Both sides do the same work on the same kind of memory pools: store a batch
of new blocks (handshake + GPU-pool -> CPU copy), look it up, load it back
(handshake + CPU -> GPU-pool copy). The actor side goes through
``kv.store`` / ``kv.lookup`` / ``kv.load`` (coordinator, policy actor, tier
actors); the baseline calls one :class:`~kvactors.manager.OffloadingManager`
and copies inline with the same copy function the tier actors use, as a
scheduler embedding the core would. Also reported: the microseconds of one
bare ``ask`` round trip, and per actor how many messages went through its
mailbox and how many an idle actor answered at once in the asker's task.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import anyio
import torch

import kvactors
from kvactors.actors import Actor
from kvactors.cli.report import RATE, RATIO, Report
from kvactors.config import Config, GPUConfig, TierConfig
from kvactors.manager import OffloadingManager
from kvactors.media import MemoryPool, copy_rows

GOAL_RATIO = 0.5


class _Echo(Actor[int]):
    async def handle(self, message: int) -> int:
        return message


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64], help="keys per call")
    parser.add_argument("--blocks", type=int, default=80_000, help="blocks moved per measurement")
    parser.add_argument("--block-kib", type=int, default=4, help="block size in KiB")
    parser.add_argument("--clients", type=int, default=4, help="concurrent callers (actor path)")
    parser.add_argument("--repeat", type=int, default=5, help="best of N")


def _sync_round(batch: int, rounds: int, bb: int, cap: int) -> float:
    gpu = MemoryPool("gpu", batch, bb, torch.device("cpu"))
    cpu = MemoryPool("cpu", cap, bb, torch.device("cpu"))
    mgr = OffloadingManager(cap, block_size=bb)
    slots = list(range(batch))
    start = time.perf_counter()
    for r in range(rounds):
        keys = list(range(r * batch, (r + 1) * batch))
        out = mgr.prepare_store(keys)
        assert out is not None
        copy_rows(gpu.data, slots, cpu.data, out.store_spec.block_ids)
        mgr.complete_store(keys)
        mgr.lookup(keys)
        spec = mgr.prepare_load(keys)
        copy_rows(cpu.data, spec.block_ids, gpu.data, slots)
        mgr.complete_load(keys)
    return time.perf_counter() - start


async def _actor_round(
    batch: int, rounds: int, bb: int, cap: int, clients: int, asks: dict[str, int] | None = None
) -> float:
    config = Config(
        block_bytes=bb,
        gpu=GPUConfig(num_blocks=batch * clients, device="cpu"),
        cpu=TierConfig(num_blocks=cap),
        nvme=None,
    )
    async with kvactors.open(config) as kv:
        per_client = rounds // clients

        async def client(c: int) -> None:
            slots = list(range(c * batch, (c + 1) * batch))
            for r in range(per_client):
                base = (c * per_client + r) * batch
                keys = list(range(base, base + batch))
                await kv.store(keys, slots)
                await kv.lookup(keys)
                await kv.load(keys, slots)

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for c in range(clients):
                tg.start_soon(client, c)
        elapsed = time.perf_counter() - start
        if asks is not None:
            # Messages handled, and of those answered in the asker's task.
            for actor in (await kv.stats()).actors:
                asks[f"{actor.name}.handled"] = actor.handled
                asks[f"{actor.name}.direct"] = actor.handled_direct
        return elapsed


async def _ask_round_trip(n: int = 20_000) -> float:
    async with anyio.create_task_group() as tg:
        echo = _Echo("echo")
        await tg.start(echo.run)
        start = time.perf_counter()
        for i in range(n):
            await echo.ask(i)
        elapsed = time.perf_counter() - start
        await echo.stop()
    return elapsed / n * 1e6


def _asks_note(batch: int, result: Any) -> str:
    """Where the messages of one actor run went: mailbox or answered at once."""
    asks: dict[str, int] = result["asks"]
    parts = []
    for name in ("coordinator", "policy", "gpu", "cpu"):
        handled = asks.get(f"{name}.handled", 0)
        direct = asks.get(f"{name}.direct", 0)
        parts.append(f"{name} {handled - direct}/{direct}")
    return (
        f"batch {batch}: {result['calls']} calls; messages via mailbox/answered at once: "
        + ", ".join(parts)
    )


def run(args: argparse.Namespace) -> Report:
    bb = args.block_kib * 1024
    rows: list[list[object]] = []
    results: dict[str, object] = {}
    met = True
    for batch in args.batches:
        rounds = max(args.clients, args.blocks // batch)
        rounds -= rounds % args.clients
        cap = max(4 * batch * args.clients, 1024)
        ops = rounds * batch * 3  # store + lookup + load, per block
        sync_best = actor_best = float("inf")
        asks: dict[str, int] = {}
        for _ in range(args.repeat):
            sync_best = min(sync_best, _sync_round(batch, rounds, bb, cap))
            actor_best = min(
                actor_best, anyio.run(_actor_round, batch, rounds, bb, cap, args.clients, asks)
            )
        sync_rate, actor_rate = ops / sync_best, ops / actor_best
        ratio = actor_rate / sync_rate
        if batch >= 64:
            met &= ratio >= GOAL_RATIO
        rows.append([batch, sync_rate, actor_rate, ratio])
        results[str(batch)] = {
            "sync_block_ops_per_s": sync_rate,
            "actor_block_ops_per_s": actor_rate,
            "ratio": ratio,
            "calls": rounds * 3,
            "asks": asks,
        }
    rtt = min(anyio.run(_ask_round_trip) for _ in range(args.repeat))
    summary: dict[str, Any] = {
        "block_bytes": bb,
        "clients": args.clients,
        "batches": results,
        "ask_round_trip_us": rtt,
        "goal_ratio_at_64": GOAL_RATIO,
        "goal_met": met,
    }
    return Report(
        title="kvactors bench actors: store + lookup + load, block-ops/s",
        columns=["batch", "sync core", "actor path", "ratio"],
        rows=rows,
        summary=summary,
        formats={"sync core": RATE, "actor path": RATE, "ratio": RATIO},
        notes=[
            f"one ask round trip: {rtt:.1f} us; "
            f"{args.clients} concurrent callers on the actor path",
            *(_asks_note(batch, results[str(batch)]) for batch in args.batches),
            f"goal: actor path >= {GOAL_RATIO}x the sync core at 64-key batches: "
            + ("met" if met else "NOT met"),
        ],
    )
