"""``kvactors bench policy --memory N``: RAM per block of a filled manager."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys

import pytest

from kvactors.cli import main
from kvactors.cli.bench.policy import MeasureFailed, _child_answer


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


def _run_with_address_space(limit: int, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """``kvactors ARGV`` in a fresh interpreter whose address space (and its children's)
    is capped at ``limit`` bytes, so running out of memory is a quick ``MemoryError``."""
    code = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))\n"
        "from kvactors.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    env = {**os.environ, "CI": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )


def test_bench_policy_memory_out_of_memory_is_one_line_and_exit_1() -> None:
    """A --memory child that runs out of memory is reported by the parent as the README
    says (one line, status 1), instead of the parent waiting forever for its answer."""
    argv = ["bench", "policy", "--policy", "lru", "--memory", "30000000", "--json"]
    done = _run_with_address_space(1536 * 2**20, argv)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "kvactors: error: out of memory (try smaller sizes)\n"


def test_bench_policy_memory_past_a_managers_blocks_is_a_usage_error() -> None:
    """N past a manager's 2**31 - 1 blocks is refused at parse time, as --blocks is, not
    after the child has made 2 N keys. (Capped, so a regression fails instead of
    taking the machine's memory.)"""
    done = _run_with_address_space(1536 * 2**20, ["bench", "policy", "--memory", "2147483648"])
    assert (done.returncode, done.stdout) == (2, "")
    assert "usage: kvactors bench policy" in done.stderr
    assert done.stderr.endswith(
        "kvactors bench policy: error: argument --memory: must be in 1..2147483647, "
        "got 2147483648\n"
    )


def test_memory_child_that_dies_without_answering_is_a_typed_error() -> None:
    context = multiprocessing.get_context("spawn")
    answers = context.Queue()
    child = context.Process(target=os._exit, args=(3,))
    child.start()
    with pytest.raises(MeasureFailed, match="lru process exited with status 3 before reporting"):
        _child_answer(child, answers, "lru")
    child.join()


def test_memory_child_error_is_raised_as_a_typed_error() -> None:
    context = multiprocessing.get_context("spawn")
    answers = context.Queue()
    answers.put(("error", "num_blocks must be in 1..2147483647"))
    child = context.Process(target=os._exit, args=(0,))
    child.start()
    with pytest.raises(MeasureFailed, match="--memory: num_blocks must be"):
        _child_answer(child, answers, "lru")
    child.join()
