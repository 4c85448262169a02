"""``kvactors bench paged`` at a tiny size: the report's shape and its exact counts."""

from __future__ import annotations

import argparse

import msgspec
import pytest

from kvactors.cli.bench import paged


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    paged.add_arguments(parser)
    args = parser.parse_args(list(argv))
    args.json = True  # as the CLI sets it: no progress bar
    return args


@pytest.mark.parametrize("offloader", ["memory", "coordinator"])
def test_bench_paged_reports_both_measures_against_their_baselines(offloader: str) -> None:
    args = parse(
        "--requests", "20", "--prompt", "32", "--decode", "4", "--block-size", "4",
        "--layers", "2", "--kv-heads", "2", "--head-dim", "8", "--swap-blocks", "6",
        "--repeat", "2", "--offloader", offloader,
    )  # fmt: skip
    report = paged.run(args)
    assert report.columns == ["subject", "ops/s", "GB/s", "best s", "x baseline", "goal met"]
    assert [row[0] for row in report.rows] == [
        "bare free list",
        "BlockAllocator",
        "contiguous out and back",
        "swap_out + swap_in",
    ]
    summary = report.summary
    assert summary["ops_per_run"] == 20 * (1 + 4) + 20  # allocate + 4 extends, then free
    trip = summary["round_trip"]
    assert isinstance(trip, dict)
    assert (trip["offloader"], trip["blocks"], trip["block_bytes"]) == (offloader, 6, 512)
    assert trip["gbps"] > 0
    assert trip["baseline_gbps"] > 0
    decoded = msgspec.json.decode(report.to_json())
    assert decoded["summary"]["ops_per_run"] == 120
