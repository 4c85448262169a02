"""What the two serving examples share: their command line, the trace they
replay, the tiers they run on, and the bytes of a "computed" block (checked
whenever a block is reused).

Not an example of its own: ``python examples/async_serving.py`` and
``python examples/sync_scheduler.py`` import it from this folder.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

import kvactors
from kvactors.cli.arguments import positive_int
from kvactors.cli.demo import block_bytes_for
from kvactors.traces import bundled_trace, load_trace

BLOCK_BYTES = 16 * 1024


def parse(argv: list[str] | None, doc: str, width: str) -> tuple[list[list[int]], int]:
    """``--requests N`` (the first N requests of the bundled conversation trace,
    each as its chained block hashes) and ``--WIDTH`` (how many run at once)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--requests", type=positive_int, default=300)
    parser.add_argument(f"--{width}", type=positive_int, default=4)
    args = parser.parse_args(argv)
    requests = [r.hash_ids for r in load_trace(bundled_trace("conversation"))][: args.requests]
    return requests, int(getattr(args, width))


def config(ranges: int, longest: int) -> kvactors.Config:
    """GPU pool of ``ranges`` slot ranges of ``longest`` slots, then CPU, then NVMe."""
    return kvactors.Config(
        block_bytes=BLOCK_BYTES,
        gpu=kvactors.GPUConfig(num_blocks=ranges * longest),
        cpu=kvactors.TierConfig(num_blocks=1024),
        nvme=kvactors.NVMeConfig(num_blocks=4096),
    )


def check_reused(pool: Any, blocks: list[int], slots: list[int]) -> None:
    """The loaded slots hold what ``compute`` wrote for these blocks."""
    if not torch.equal(pool.rows(slots), block_bytes_for(blocks, BLOCK_BYTES, pool.device)):
        raise SystemExit("a reused block differs from what was stored")


def compute(pool: Any, blocks: list[int], slots: list[int]) -> None:
    """Stand in for the model: fill the slots with bytes derived from the keys."""
    pool.write_rows(slots, block_bytes_for(blocks, BLOCK_BYTES, pool.device))


def report(totals: dict[str, int]) -> None:
    """One line: each count, then the share of blocks that were reused."""
    ratio = totals["reused"] / max(1, totals["blocks"])
    print("  ".join(f"{name} {n}" for name, n in totals.items()) + f"  reuse ratio {ratio:.3f}")
