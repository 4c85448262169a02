"""``kvactors bench vllm`` without engines (copy path, requests from the trace); the
engine runs themselves are exercised by test_vllm_engine.py's runs of the same runner."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kvactors.cli.bench import vllm as bench
from kvactors.traces import TraceRequest, bundled_trace, load_trace
from kvactors.vllm.engine import EngineRunError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(list(argv))
    args.json = True
    return args


def test_copy_only_reports_the_copy_path_against_a_contiguous_copy() -> None:
    args = parse(
        "--copy-only", "--copy-layers", "4", "--copy-page", "4096", "--copy-blocks", "8",
        "--repeat", "2",
    )  # fmt: skip
    report = bench.run(args)
    assert [row[0] for row in report.rows] == [
        "copy: contiguous out+back",
        "copy: gather + scatter",
    ]
    copy = report.summary["copy_path"]
    assert isinstance(copy, dict)
    assert copy["bytes"] == 8 * 4 * 4096
    assert copy["gbps"] > 0
    assert copy["ratio_vs_baseline"] == pytest.approx(copy["gbps"] / copy["baseline_gbps"])
    assert copy["goal_met"] == (copy["ratio_vs_baseline"] >= bench.MIN_COPY_RATIO)
    assert "engines" not in report.summary


def test_equal_hash_ids_make_equal_token_blocks() -> None:
    reqs = [
        TraceRequest(timestamp=0, input_length=1024, output_length=1, hash_ids=[0, 1]),
        TraceRequest(timestamp=1, input_length=700, output_length=1, hash_ids=[0, 2]),
    ]
    a, b = bench.trace_prompts(reqs, tokens_per_hash=8, max_hashes=10)
    assert len(a) == 16  # two full blocks
    assert len(b) == 11  # 700 of 1024 tokens: the last block cut, scaled
    assert a[:8] == b[:8]
    assert a[8:] != b[8:11]


def test_the_slice_keeps_multi_turn_conversations() -> None:
    trace = load_trace(bundled_trace("conversation"))
    picked = bench.trace_slice(trace, 0, 2000, 40)
    assert len(picked) == 40
    conversations = {r.hash_ids[1] for r in picked}
    assert len(conversations) < 40  # turns of the same conversation share a prefix


def test_without_vllm_the_error_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "find_vllm_python", lambda: None)
    args = parse("--copy-layers", "2", "--copy-page", "1024", "--copy-blocks", "2", "--repeat", "1")
    with pytest.raises(EngineRunError, match=r"setup\.sh --test"):
        bench.run(args)


def test_start_takes_its_default_of_zero_and_refuses_a_negative_line() -> None:
    assert parse("--start", "0").start == 0
    with pytest.raises(SystemExit):
        parse("--start", "-1")


def test_a_vllm_python_that_is_not_an_interpreter_is_one_typed_error(tmp_path: Path) -> None:
    text = tmp_path / "not-python"
    text.write_text("just text\n")
    text.chmod(0o755)
    args = parse("--vllm-python", str(text), "--copy-layers", "1", "--copy-page", "1024",
                 "--copy-blocks", "1", "--repeat", "1")  # fmt: skip
    with pytest.raises(EngineRunError, match="not-python"):
        bench.run(args)
