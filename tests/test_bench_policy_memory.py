"""``kvactors bench policy --memory N``: RAM per block of a filled manager."""

from __future__ import annotations

import json

import pytest

from kvactors.cli import main


def test_bench_policy_memory_reports_bytes_per_block(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "policy", "--policy", "arc", "--memory", "20000", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])["summary"]
    assert summary["blocks"] == 20000
    assert summary["key_object_bytes"] > 32
    arc = summary["policies"]["arc"]
    assert arc["core"] in ("compiled", "python")
    # A filled manager takes some RAM per block, and remembering N evicted keys
    # (ARC's ghosts) takes more.
    assert 0 < arc["bytes_per_block_full"] < 2000
    assert arc["bytes_per_block_after_evicting_all"] >= arc["bytes_per_block_full"]
