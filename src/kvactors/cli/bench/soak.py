"""``kvactors bench soak``: a longer soak with injected faults; blocks lost must be 0."""

from __future__ import annotations

import argparse

from kvactors.cli.arguments import positive_float, positive_int, probability
from kvactors.cli.report import COUNT, Report
from kvactors.cli.soak import run_soak
from kvactors.cli.stopping import run_async


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=positive_float, default=30.0, help="how long to run")
    parser.add_argument("--clients", type=positive_int, default=16, help="concurrent clients")
    parser.add_argument(
        "--keys",
        type=_keys,
        default=2000,
        help="size of the key space, at least 8 (the CPU tier holds keys / 8, NVMe keys / 2)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--write-faults", type=probability, default=0.02, help="P(ENOSPC) per write"
    )
    parser.add_argument(
        "--read-faults", type=probability, default=0.02, help="P(flipped byte) per read"
    )


def _keys(text: str) -> int:
    """argparse type of ``--keys``: an int of at least 8, so the CPU tier has a slot."""
    keys = positive_int(text)
    if keys < 8:
        raise argparse.ArgumentTypeError(
            f"must be at least 8 (the CPU tier holds keys / 8), got {keys}"
        )
    return keys


def run(args: argparse.Namespace) -> Report:
    res = run_async(
        lambda: run_soak(
            seconds=args.seconds,
            clients=args.clients,
            keys=args.keys,
            seed=args.seed,
            p_write_fault=args.write_faults,
            p_read_fault=args.read_faults,
        )
    )
    ok = res.wrong_bytes == 0 and res.lost == 0 and res.invariants_ok
    rows: list[list[object]] = [
        ["operations", res.operations],
        ["stores", res.stores],
        ["loads", res.loads],
        ["blocks verified", res.blocks_verified],
        ["faults injected", res.faults_injected],
        ["typed errors seen by callers", res.errors_seen],
        ["wrong bytes served", res.wrong_bytes],
        ["blocks lost", res.lost],
        ["invariants hold", res.invariants_ok],
    ]
    return Report(
        title=f"kvactors bench soak: {res.seconds:.1f} s, {args.clients} clients",
        columns=["what", "count"],
        rows=rows,
        summary={**{f: getattr(res, f) for f in res.__struct_fields__}, "passed": ok},
        formats={"count": COUNT} if all(isinstance(r[1], int) for r in rows) else {},
        notes=["PASSED: nothing lost, nothing wrong" if ok else "FAILED"],
        status=0 if ok else 1,  # a CI job running it fails with it
    )
