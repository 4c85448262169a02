"""``kvactors bench remote``: the remote tier against raw redis-py on the same server.

With no ``--url`` it starts a throwaway Valkey / Redis server on 127.0.0.1
(see :mod:`kvactors.media.local_server`), so it runs on a fresh machine.

- **Store / load GB/s** at each block size: ``kv.store`` of blocks into a
  cache whose remote tier writes them through, and ``kv.load`` of the same
  blocks by a second cache whose local tiers do not hold them (each block read
  from the server, verified, promoted to CPU and copied out), against raw
  redis-py ``SET`` / ``GET`` of the same bytes to the same server in the same
  run, made two ways: one call per block, and one ``pipeline`` per batch of
  about 8 MiB of values; the baseline of each cell is the faster of the two
  by their median rounds (named in the table), taken at its best round as
  kvactors is, and the goal is kvactors >= 0.8x it. In each of
  ``--repeat`` rounds the two raw ``SET`` ways and ``kv.store`` run, then the
  two raw ``GET`` ways and ``kv.load``, the three sides taking turns at going
  first (round ``r`` rotates their order by ``r``), then the remote medium
  alone (``RemoteStore.put`` / ``get_into``) runs, after one round that is
  not measured (the caches' CPU tiers then full and evicting, as in every
  later round, and the server's memory grown), the objects the process held
  before it kept out of the garbage collector's scans (``gc.freeze``); figures are the best round
  of each, and the spread of kvactors / raw within each round is shown
  beside them. Clients and caches
  stay open across rounds, as an engine's do (each round uses new keys), and
  each side has connected to the server before the first round. Loads
  on every side go into a destination written before, as an engine's buffers
  are (a fresh one would mostly measure first-touch page faults).
- **Round trip**: one block's ``GET`` (raw) against one block's remote fetch
  and one ``kv.load`` of a block only the server holds, median microseconds.
- **Sharing**: two processes replay alternate requests of a trace (two
  engines behind a load balancer), each with a small CPU tier, through one
  server: the hit ratio when they share a namespace against each using its
  own (alone), in the same run.

The store / load rounds (raw redis-py both ways, the caches, the medium alone)
are in :mod:`kvactors.cli.bench.remote_rounds`; this module runs the round
trips and the sharing replay and makes the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

import torch

import kvactors
from kvactors.cli.arguments import block_count, positive_int, resolve_trace
from kvactors.cli.bench.remote_rounds import (
    RAW_BATCH_BYTES,
    RAW_MODES,
    cache_config,
    measure_rounds,
)
from kvactors.cli.report import GBPS, RATIO, Report, progress
from kvactors.cli.stopping import run_async
from kvactors.errors import RemoteUnavailable
from kvactors.media.local_server import LocalServer, interrupts_held
from kvactors.media.remote import RemoteStore
from kvactors.media.remote_nodes import masked_url
from kvactors.traces import load_trace

GOAL_RATIO = 0.8
WORKER_URL = "KVACTORS_BENCH_REMOTE_URL"
"""The environment variable that hands a replay process the server's URL."""
_MAIN = "import sys; from kvactors.cli import main; sys.exit(main(sys.argv[1:]))"
CPU = torch.device("cpu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="server to use (default: start one on 127.0.0.1)")
    parser.add_argument(
        "--sizes", type=positive_int, nargs="+", default=[64, 512, 2048], help="block sizes in KiB"
    )
    parser.add_argument("--mib", type=positive_int, default=64, help="MiB moved per measurement")
    parser.add_argument("--repeat", type=positive_int, default=5, help="rounds (best of N)")
    parser.add_argument("--trace", help="trace for the sharing figure (default: bundled)")
    parser.add_argument(
        "--requests", type=positive_int, default=1500, help="trace requests replayed"
    )
    parser.add_argument(
        "--cpu-blocks", type=block_count, default=256, help="CPU tier of each engine"
    )
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)


async def _round_trips(url: str, bb: int, n: int = 200) -> dict[str, float]:
    import redis

    rows = torch.randint(0, 256, (1, bb), dtype=torch.uint8)
    view = memoryview(rows.numpy()).cast("B")  # type: ignore[arg-type]
    client = redis.Redis.from_url(url)
    client.set(b"bench-rt", view)
    raw: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.get(b"bench-rt")
        raw.append(time.perf_counter() - t0)
    client.delete(b"bench-rt")
    client.close()
    namespace = f"bench-rt-{uuid.uuid4().hex[:8]}"
    store = RemoteStore("remote", bb, url=url, namespace=namespace)
    store.write_from([], rows, [0])
    medium: list[float] = []
    dst = torch.empty_like(rows)
    for _ in range(n):
        t0 = time.perf_counter()
        store.read_into([], dst, [0])
        medium.append(time.perf_counter() - t0)
    store.write_from([], rows.expand(n, bb).contiguous(), list(range(1, n + 1)))
    store.close()
    cache: list[float] = []
    cfg = cache_config(url, bb, 1, namespace, cpu_blocks=2 * n)
    async with kvactors.open(cfg) as kv:
        for k in range(1, n + 1):
            t0 = time.perf_counter()
            await kv.load([k], dst)  # only on the server: a fetch, a promotion, a copy
            cache.append(time.perf_counter() - t0)
    return {
        "raw_get_us": statistics.median(raw) * 1e6,
        "remote_fetch_us": statistics.median(medium) * 1e6,
        "kv_load_us": statistics.median(cache) * 1e6,
    }


async def _replay(url: str, namespace: str, half: int, trace: str, requests: int, cpu: int) -> Any:
    """One engine: every other request of the trace, starting at ``half``."""
    reqs = load_trace(trace)[:requests][half::2]
    bb = 4096
    longest = max((len(r.hash_ids) for r in reqs), default=0) or 1
    cfg = cache_config(url, bb, longest, namespace, cpu_blocks=cpu)
    hits = total = 0
    async with kvactors.open(cfg) as kv:
        dst = torch.empty((longest, bb), dtype=torch.uint8)
        for r in reqs:
            keys = list(r.hash_ids)
            n = len(keys)
            if not n:
                continue  # a request shorter than one block
            got = await kv.load(keys, dst[:n], partial=True)
            h = len(got.tiers)
            hits += h
            total += n
            if h < n:
                await kv.store(keys[h:], dst[: n - h])
    return {"hits": hits, "keys": total}


def _sharing(url: str, trace: str, requests: int, cpu: int) -> dict[str, float]:
    """Hit ratios of two engine processes, alone (own namespaces) and sharing one.

    The replay processes run in sessions of their own, so a terminal's Ctrl-C
    reaches only this process, which then stops them (nothing else prints)."""
    tag = uuid.uuid4().hex[:8]
    out: dict[str, float] = {}
    for mode in ("alone", "shared"):
        procs: list[subprocess.Popen[str]] = []
        try:
            for half in (0, 1):
                ns = f"bench-{tag}-{mode}" + (f"-{half}" if mode == "alone" else "")
                cmd = [sys.executable, "-c", _MAIN, "bench", "remote", "--json"]
                cmd += ["--requests", str(requests), "--cpu-blocks", str(cpu)]
                cmd += ["--worker", ns, str(half), trace, "x"]
                # The URL (it may carry a password) by environment, not on the
                # command line that any user of the machine can list.
                env = {**os.environ, WORKER_URL: url}
                with interrupts_held():  # none started that the finally cannot stop
                    procs.append(
                        subprocess.Popen(
                            cmd, stdout=subprocess.PIPE, text=True, start_new_session=True, env=env
                        )
                    )
            hits = keys = 0
            for p in procs:
                stdout, _ = p.communicate(timeout=600)
                if p.returncode != 0:
                    raise RuntimeError(f"bench remote: a replay process failed ({p.returncode})")
                result = json.loads(stdout.strip().splitlines()[-1])["summary"]
                hits += result["hits"]
                keys += result["keys"]
        finally:
            for p in procs:  # none outlives the bench (Ctrl-C, a failure, a timeout)
                if p.poll() is None:
                    p.kill()
                    p.communicate()
        out[mode] = hits / keys if keys else 0.0
    return out


def check_answers(url: str, command: str = "bench remote") -> None:
    """RemoteUnavailable (one line, exit 2) when no server answers at ``url``, or
    it refuses the URL's credentials (a wrong password, a user it does not know);
    ``command`` begins the message (``bench remote``, ``demo``)."""
    store = RemoteStore("remote", 4096, url=url, namespace=f"bench-{uuid.uuid4().hex[:8]}")
    try:
        if not store.ping():
            error = store.nodes.by_name["server"].error
            if error.startswith(("AuthenticationError", "NoPermissionError")):
                raise RemoteUnavailable(
                    f"{command}: the server at {masked_url(url)} refused the login: {error}"
                )
            raise RemoteUnavailable(f"{command}: no server answers at {masked_url(url)}")
    finally:
        store.close()


def run(args: argparse.Namespace) -> Report:
    trace = str(resolve_trace(args.trace))
    if not args.worker:
        load_trace(trace)  # a bad trace is a TraceError here, not in a replay process
    if args.worker:
        ns, half, wtrace, _ = args.worker
        url = os.environ[WORKER_URL]
        result = run_async(_replay, url, ns, int(half), wtrace, args.requests, args.cpu_blocks)
        return Report(
            title="replay worker",
            columns=["hits", "keys"],
            rows=[[result["hits"], result["keys"]]],
            summary=result,
        )
    if args.url:
        check_answers(args.url)
    server: LocalServer | None = None
    try:  # from before the server exists, so an interrupt at any point stops it
        if not args.url:
            server = LocalServer()
            server.start()
        return _run(args, args.url or server.url, trace)  # type: ignore[union-attr]
    finally:
        if server is not None:
            server.stop()


def _run(args: argparse.Namespace, url: str, trace: str) -> Report:
    rows_out: list[list[object]] = []
    summary: dict[str, Any] = {"url": masked_url(url), "sizes": {}}
    met = True
    quiet = args.json
    for kib in progress(
        args.sizes, len(args.sizes), "bench remote", enabled=None if not quiet else False
    ):
        bb = kib * 1024
        n = max(4, args.mib * 2**20 // bb)
        rows = torch.randint(0, 256, (n, bb), dtype=torch.uint8)
        rounds = run_async(measure_rounds, url, rows, args.repeat)
        gb = n * bb / 1e9
        speed = {name: gb / min(s) for name, s in rounds.items()}
        won: dict[str, str] = {}
        for op in ("set", "get"):
            # The baseline: the faster of one call per block and pipelines, by
            # their median rounds; then its best round, as kvactors' (each side
            # the best of as many rounds: the better of two ways' bests would be
            # the best of twice as many).
            won[op] = max(
                RAW_MODES,
                key=lambda mode: statistics.median(gb / x for x in rounds[f"raw_{op}_{mode}"]),
            )
            speed[f"raw_{op}"] = speed[f"raw_{op}_{won[op]}"]
            rounds[f"raw_{op}"] = [
                min(each) for each in zip(*(rounds[f"raw_{op}_{mode}"] for mode in RAW_MODES))
            ]
        store_ratio = speed["kv_store"] / speed["raw_set"]
        load_ratio = speed["kv_load"] / speed["raw_get"]
        met &= store_ratio >= GOAL_RATIO and load_ratio >= GOAL_RATIO
        # kvactors / the faster raw way within each round (measured a moment apart).
        paired = {
            op: [r / k for k, r in zip(rounds[kv], rounds[raw])]
            for op, kv, raw in (("store", "kv_store", "raw_set"), ("load", "kv_load", "raw_get"))
        }
        for op, raw, medium, kv, ratio in (
            ("store", "set", "medium_put", "kv_store", store_ratio),
            ("load", "get", "medium_get", "kv_load", load_ratio),
        ):
            each = sorted(paired[op])
            spread = f"{each[0]:.2f} / {statistics.median(each):.2f} / {each[-1]:.2f}"
            rows_out.append(
                [
                    op,
                    kib,
                    speed[f"raw_{raw}_call"],
                    speed[f"raw_{raw}_pipeline"],
                    won[raw],
                    speed[medium],
                    speed[kv],
                    ratio,
                    spread,
                ]
            )
        summary["sizes"][str(kib)] = {
            **{f"{k}_gbps": v for k, v in speed.items()},
            "store_baseline": won["set"],
            "load_baseline": won["get"],
            "store_ratio": store_ratio,
            "load_ratio": load_ratio,
            "rounds_gbps": {k: [gb / x for x in s] for k, s in rounds.items()},
            "store_ratio_rounds": paired["store"],
            "load_ratio_rounds": paired["load"],
        }
    trips = run_async(_round_trips, url, args.sizes[0] * 1024)
    summary["round_trip"] = trips
    share = _sharing(url, trace, args.requests, args.cpu_blocks)
    summary["sharing"] = share
    summary["goal_ratio"] = GOAL_RATIO
    summary["goal_met"] = met
    notes = [
        f"round trip of one {args.sizes[0]} KiB block (median us): "
        f"raw GET {trips['raw_get_us']:.0f}, remote fetch {trips['remote_fetch_us']:.0f}, "
        f"kv.load {trips['kv_load_us']:.0f}",
        f"two engines replaying alternate requests ({args.requests} of the trace, "
        f"{args.cpu_blocks} CPU blocks each): hit ratio alone {share['alone']:.3f}, "
        f"sharing one server {share['shared']:.3f}",
        "raw redis-py: one SET / GET call per block, and one pipeline per "
        f"{RAW_BATCH_BYTES // 2**20} MiB of values; the baseline is the faster "
        "of the two by median round (column 'baseline'), per cell, at its best round",
        f"goal: kvactors >= {GOAL_RATIO}x raw redis-py at every size: "
        + ("met" if met else "NOT met"),
        f"server: {masked_url(url)}; best of {args.repeat} rounds, {args.mib} MiB per measurement "
        "(ratio: of the bests; per round: kvactors / the faster raw of the same round)",
    ]
    return Report(
        title="remote tier vs raw redis-py (GB/s)",
        columns=[
            "op",
            "KiB",
            "raw call",
            "raw pipeline",
            "baseline",
            "remote medium",
            "kvactors",
            "ratio",
            "per round min / median / max",
        ],
        rows=rows_out,
        formats={
            "raw call": GBPS,
            "raw pipeline": GBPS,
            "remote medium": GBPS,
            "kvactors": GBPS,
            "ratio": RATIO,
        },
        summary=summary,
        notes=notes,
    )
