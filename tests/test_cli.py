"""The ``kvactors`` command line: tables, ``--json``, errors and exit codes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _workloads import write_trace
from kvactors.cli import BENCHES, COMMANDS, main
from kvactors.manager import NATIVE

# The hand-worked trace of tests/test_replay.py: with 4 blocks LRU finds 7 leading
# hits of 18 accesses and evicts 6 times; 7 unique blocks.
HAND_TRACE = [[1, 2, 3], [1, 2, 4], [1, 5, 6], [1, 2, 3], [1, 5], [2, 3], [7, 2]]


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    return write_trace(tmp_path / "hand.jsonl", HAND_TRACE)


def last_json(out: str) -> dict[str, Any]:
    lines = out.strip().splitlines()
    assert len(lines) == 1, "--json prints exactly one line"
    value = json.loads(lines[-1])
    assert isinstance(value, dict)
    return value


def test_replay_table(trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """4 blocks. LRU: 7 hits, 6 evictions (tests/test_replay.py). MIN, with next uses:
    r0 stores 1,2,3; r1 2 hits, stores 4 in the free slot; r2 1 hit, evicts 4
    (never used again) and 3 (tie with 2 at r3, deeper); r3 2 hits, evicts 6;
    r4 2 hits; r5 2 hits; r6 [7,2] no leading hit, evicts one block.
    MIN: 9 hits (0.500), 4 evictions; 2 is resident at r6 but not leading, so
    MIN finds 10 resident blocks and the trace is flagged as not prefix-closed.
    """
    assert main(["replay", str(trace), "--blocks", "4", "--policy", "lru"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == "replay: hand.jsonl, 4 blocks"
    assert lines[1] == ""
    assert lines[2].split() == [
        "policy", "hits", "hit", "ratio", "MIN", "bound", "of", "MIN", "of", "gap", "stores",
        "refused", "evictions",
    ]  # fmt: skip
    assert set(lines[3]) == {"-", " "}
    assert lines[4].split() == ["lru", "7", "0.389", "0.500", "0.778", "0.000", "0", "6"]
    assert len(lines) > 5
    assert lines[5] == ""
    notes = lines[6:]
    assert f"trace: {trace} (7 requests, 18 block accesses)" in notes
    assert "capacity: 4 blocks (--blocks 4)" in notes
    bound_note = next(note for note in notes if note.startswith("MIN bound:"))
    assert "Belady's offline MIN on the same accesses, 9 hits" in bound_note
    assert any("not prefix-closed: MIN finds 10 blocks resident" in note for note in notes)


def test_replay_json_summary(trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--capacity 0.5 of 7 unique blocks is 3 blocks.

    LRU (least recent first): r0 1 2 3; r1 2 hits, evict 3; r2 1 hit, evict 2,4;
    r3 1 hit, evict 5,6; r4 1 hit, evict 2; r5 [2,3] 0 hits, evict 1; r6 0 hits,
    evict 5: 5 hits, 8 evictions. MIN: r1 2 hits (evict 3); r2 1 (evict 2,4);
    r3 1 (evict 5,6); r4 1 (evict 3, deeper than 2); r5 1 (evict 5); r6 0
    (evict 3; 2 resident, not leading): 6 hits, 7 resident, 8 evictions.
    """
    assert main(["replay", str(trace), "--capacity", "0.5", "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    report = last_json(out)
    summary = report["summary"]
    assert summary["command"] == "replay"
    assert summary["trace"] == str(trace)
    assert summary["capacity_blocks"] == 3
    assert summary["capacity_fraction"] == 0.5
    assert summary["unique_blocks"] == 7
    assert summary["requests"] == 7
    assert summary["block_accesses"] == 18
    assert summary["belady"] == {
        "hits": 6,
        "resident_hits": 7,
        "hit_ratio": 6 / 18,
        "stores_refused": 0,
        "evictions": 8,
    }
    policies = summary["policies"]
    assert list(policies) == ["lru", "arc", "weighted_lru", "prefix_admit"]
    lru = policies["lru"]
    assert (lru["hits"], lru["evictions"], lru["stores_refused"]) == (5, 8, 0)
    assert lru["hit_ratio"] == 5 / 18
    assert lru["of_belady"] == 5 / 6
    rows = report["rows"]
    assert rows[0] == ["lru", 5, 5 / 18, 6 / 18, 5 / 6, 0.0, 0, 8]
    assert summary["mode"] == "manager"
    assert summary["lru_hits"] == 5
    assert lru["of_gap"] == 0.0
    # Every policy's share of the LRU -> MIN gap (5 -> 6 hits) is (hits - 5) / 1.
    for name, result in policies.items():
        assert result["of_gap"] == result["hits"] - 5, name


def test_replay_capacity_floor_from_the_cli(
    trace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """7 unique blocks: 0.29 -> floor(2.03) = 2; 1/7 -> exactly 1; 0.1 -> 0 is an error."""
    assert main(["replay", str(trace), "--capacity", "0.29", "--json"]) == 0
    assert last_json(capsys.readouterr().out)["summary"]["capacity_blocks"] == 2
    assert main(["replay", str(trace), "--capacity", "1/7", "--json"]) == 0
    assert last_json(capsys.readouterr().out)["summary"]["capacity_blocks"] == 1
    assert main(["replay", str(trace), "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "kvactors: error: --capacity 0.1 of 7 unique blocks is 0 blocks; it must give at least 1\n"
    )


def test_replay_defaults_to_the_bundled_conversation_trace(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["replay", "--policy", "lru", "--json"]) == 0
    summary = last_json(capsys.readouterr().out)["summary"]
    assert Path(str(summary["trace"])).name == "mooncake_conversation.jsonl"
    assert summary["requests"] == 12_031
    assert summary["unique_blocks"] == 182_790
    assert summary["capacity_blocks"] == 18_279  # floor(0.1 * 182,790)
    assert list(summary["policies"]) == ["lru"]


def test_malformed_trace_is_one_line_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1]}\n'
        '{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": "x"}\n'
    )
    assert main(["replay", str(path), "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (f"kvactors: error: {path}:2: Expected `array`, got `str` - at `$.hash_ids`\n")


@pytest.mark.parametrize(
    "argv",
    [
        ["replay", "--blocks", "4", "--capacity", "0.5"],
        ["replay", "--capacity", "0"],
        ["replay", "--capacity", "1.5"],
        ["replay", "--capacity", "abc"],
        ["replay", "--blocks", "0"],
        ["replay", "--blocks", "2147483648"],  # past a manager's 2**31 - 1 slots
        ["replay", "--blocks", "1e3"],
        ["demo", "--cpu-blocks", "2147483648"],
        ["demo", "--nvme-blocks", "2147483648"],
        ["bench", "remote", "--cpu-blocks", "2147483648"],
        ["replay", "--policy", "fifo"],
        ["bench", "nope"],
        ["bench"],
        ["nope"],
        [],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "usage: kvactors" in err


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, _ in COMMANDS:
        assert name in out
    assert "bench" in out
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for name, _ in BENCHES:
        assert name in out


@pytest.mark.parametrize(
    "argv", [["--help"], ["bench", "--help"]] + [["bench", name, "--help"] for name, _ in BENCHES]
)
def test_help_is_plain_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """--help prints the commands' docstrings without their reStructuredText markup."""
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "``" not in out
    for role in (":class:", ":mod:", ":func:"):
        assert role not in out
    assert "  kvactors bench" not in out  # a command's one-line help does not repeat its name


def test_bench_policy_json(trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "policy", "--trace", str(trace), "--blocks", "4", "--repeat", "2"]
    assert main([*argv, "--policy", "lru", "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    summary = last_json(out)["summary"]
    assert summary["block_ops_per_run"] == 18
    assert summary["capacity_blocks"] == 4
    assert summary["repeat"] == 2
    assert summary["baseline"]["hits"] == 7
    lru = summary["policies"]["lru"]
    assert lru["hits"] == 7
    assert lru["block_ops_per_s"] > 0
    assert lru["ratio_goal_met"] == (lru["ratio_vs_baseline"] >= 0.5)
    assert lru["rate_goal_met"] == (lru["block_ops_per_s"] >= 500_000)


def test_bench_policy_measures_the_cost_against_lru(
    trace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A policy's time per block-op over lru's, same run: lru is timed too."""
    argv = ["bench", "policy", "--trace", str(trace), "--blocks", "4", "--repeat", "1"]
    assert main([*argv, "--policy", "prefix_admit", "--json"]) == 0
    summary = last_json(capsys.readouterr().out)["summary"]
    assert summary["goals"]["max_cost_vs_lru"] == 2.0
    policies = summary["policies"]
    ours, lru = policies["prefix_admit"], policies["lru"]
    assert ours["cost_vs_lru"] == pytest.approx(ours["seconds"] / lru["seconds"])
    assert ours["cost_goal_met"] == (ours["cost_vs_lru"] <= 2.0)
    assert lru["cost_goal_met"] is None  # a goal for admission policies only
    assert lru["cost_vs_lru"] == 1.0
    assert ours["core"] == ("compiled" if NATIVE else "python")


def test_bench_policy_table(trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "policy", "--trace", str(trace), "--blocks", "4", "--repeat", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "bench policy: hand.jsonl, 4 blocks"
    assert lines[2].split()[:4] == ["handshake", "hit", "ratio", "best"]
    assert lines[4].startswith("bare OrderedDict LRU")
    assert [line.split()[0] for line in lines[5:8]] == ["lru", "arc", "weighted_lru"]
    assert lines[5].split()[1] == "0.389"  # 7 / 18, the same as the bare LRU
    assert lines[4].split()[3] == "0.389"


def test_replay_command_does_not_import_benchmarks() -> None:
    """A command's module loads only when it runs (or for --help)."""
    code = (
        "import sys; from kvactors.cli import build_parser; build_parser(['replay']); "
        "print('kvactors.cli.bench.policy' in sys.modules); "
        "build_parser(['bench', 'policy']); print('kvactors.cli.bench.policy' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.split() == ["False", "True"]


def test_console_script_keeps_stdout_clean(trace: Path) -> None:
    """The installed entry point: --json writes one line to stdout and nothing else."""
    script = Path(sys.executable).with_name("kvactors")
    if not script.exists():
        pytest.skip("kvactors console script not installed next to this interpreter")
    done = subprocess.run(
        [str(script), "replay", str(trace), "--blocks", "4", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert done.stderr == ""
    assert json.loads(done.stdout)["summary"]["policies"]["lru"]["hits"] == 7


def test_replay_served_from_the_cli(trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--served replays through kvactors.open; --bytes copies the blocks too; the
    summary says which, and both give the same placements."""
    assert main(["replay", str(trace), "--blocks", "4", "--served", "--json"]) == 0
    plain = last_json(capsys.readouterr().out)
    assert plain["summary"]["mode"] == "served, no bytes"
    assert plain["title"] == "replay: hand.jsonl, 4 blocks (served cache)"
    assert any("served cache" in note for note in plain["notes"])
    assert main(["replay", str(trace), "--blocks", "4", "--served", "--bytes", "--json"]) == 0
    copied = last_json(capsys.readouterr().out)
    assert copied["summary"]["mode"] == "served, bytes"
    for name, result in plain["summary"]["policies"].items():
        other = copied["summary"]["policies"][name]
        assert (result["hits"], result["evictions"]) == (other["hits"], other["evictions"])
        assert result["of_gap"] is None or isinstance(result["of_gap"], float)


def test_replay_bytes_needs_served(
    tmp_path: Path, trace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replay", str(trace), "--blocks", "4", "--bytes"]) == 2
    assert "--bytes needs --served" in capsys.readouterr().err
    # Said before the trace is read: not hidden behind a trace error.
    assert main(["replay", str(tmp_path / "missing.jsonl"), "--bytes"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "kvactors: error: --bytes needs --served (a bare manager moves no bytes)\n"


def test_bench_policy_on_a_trace_without_blocks_is_a_typed_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_trace(tmp_path / "empty.jsonl", [[], []])
    assert main(["bench", "policy", "--trace", str(path), "--blocks", "4", "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    why = "no block accesses to time (every request's hash_ids is empty)"
    assert err == f"kvactors: error: {path}: {why}\n"


def test_demo_verifies_blocks_whose_ids_pass_64_bits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = [2**63, 2**64 - 1, -5]
    path = write_trace(tmp_path / "wide.jsonl", [[*big, 1], [*big, 2], [*big, 1]])
    assert main(["demo", "--trace", str(path), "--no-nvme", "--device", "cpu", "--json"]) == 0
    summary = last_json(capsys.readouterr().out)["summary"]
    assert summary["requests"] == 3
    # the second and third requests find the shared three-block prefix (and the third its 1)
    assert summary["verified"] == summary["hits"] == 3 + 4
    assert summary["trace"] == str(path)


def test_demo_reports_a_block_loaded_back_wrong_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request's error leaves its task group as itself: the command prints one
    line and exits 2 (the error is not an exception group's traceback)."""
    from kvactors.cli import demo

    real = demo.block_bytes_for
    calls = 0

    def changing(*args: Any) -> Any:  # the bytes checked after a load differ
        nonlocal calls
        calls += 1
        out = real(*args)
        return out if calls == 1 else out ^ 1

    monkeypatch.setattr(demo, "block_bytes_for", changing)
    path = write_trace(tmp_path / "twice.jsonl", [[1, 2], [1, 2]])
    assert main(["demo", "--trace", str(path), "--no-nvme", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvactors: error: request 1: block 1 loaded back wrong"), err


def test_demo_accepts_a_bundled_trace_name_and_titles_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["demo", "--trace", "synthetic", "--requests", "3", "--no-nvme", "--device", "cpu"]
    assert main(argv) == 0
    title = capsys.readouterr().out.splitlines()[0]
    assert title == "kvactors demo: the synthetic trace through GPU pool, CPU"


def test_pattern_bytes_differ_for_every_64_bit_id() -> None:
    import torch

    from kvactors.cli.demo import block_bytes_for

    keys = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]
    rows = block_bytes_for(keys[:5], 64, torch.device("cpu"))
    assert len({bytes(r.numpy()) for r in rows}) == 5
    # ids equal modulo 2**64 name the same bytes: -1 and 2**64 - 1, -(2**63) and 2**63
    again = block_bytes_for([-1, keys[5]], 64, torch.device("cpu"))
    assert torch.equal(again[0], rows[4])
    assert torch.equal(again[1], rows[3])


def test_demo_on_a_trace_with_no_requests_reports_zeros(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    argv = ["demo", "--trace", str(path), "--no-nvme", "--device", "cpu"]
    assert main([*argv, "--json"]) == 0
    report = last_json(capsys.readouterr().out)
    assert report["summary"]["requests"] == report["summary"]["blocks"] == 0
    assert report["notes"][-1] == "latency p50 / p99 (us): no calls made"
    assert main(argv) == 0
    assert "latency p50 / p99 (us): no calls made" in capsys.readouterr().out


def test_requests_run_in_file_order_whatever_their_timestamps_and_extra_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Timestamps out of order, repeated, some floats; lengths that do not match
    # the block counts; fields the format does not name: the replay is the
    # same as that of the same hash_ids written with ordered timestamps.
    odd = tmp_path / "odd.jsonl"
    stamps: list[float] = [9, 3, 3, 0.5, 7, 7, 1]
    with open(odd, "w") as f:
        for ids, stamp in zip(HAND_TRACE, stamps):
            record = {"timestamp": stamp, "input_length": 1, "output_length": 0}
            f.write(json.dumps({**record, "hash_ids": ids, "session": "a", "x": [1]}) + "\n")
    plain = write_trace(tmp_path / "plain.jsonl", HAND_TRACE)
    reports = []
    for path in (odd, plain):
        assert main(["replay", str(path), "--blocks", "4", "--json"]) == 0
        reports.append(last_json(capsys.readouterr().out)["rows"])
    assert reports[0] == reports[1]
    lru = next(row for row in reports[0] if row[0] == "lru")
    assert lru[1] == 7  # tests/test_replay.py's hand-worked count


# Block ids as users' traces may have them: small, negative, past 64 bits.
IDS = st.sampled_from([0, 1, 2, 3, 7, -1, -(2**70), 2**63, 2**64 - 1, 10**30])
TRACES = st.lists(st.lists(IDS, max_size=6, unique=True), max_size=12)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(requests=TRACES, blocks=st.integers(1, 8), served=st.booleans())
def test_any_trace_in_the_format_replays_to_one_json_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    requests: list[list[int]],
    blocks: int,
    served: bool,
) -> None:
    """Empty traces, requests shorter than one block (no hash_ids), any ids: replay
    (bare manager or served cache) prints one JSON object whose counts are the trace's."""
    path = write_trace(tmp_path / "any.jsonl", requests)
    argv = ["replay", str(path), "--blocks", str(blocks), "--json"]
    assert main(argv + (["--served"] if served else [])) == 0
    out, err = capsys.readouterr()
    assert err == ""
    summary = last_json(out)["summary"]
    assert summary["requests"] == len(requests)
    assert summary["block_accesses"] == sum(map(len, requests))
    for policy in summary["policies"].values():
        assert 0 <= policy["hits"] <= summary["block_accesses"]
    assert summary["belady"]["hits"] <= summary["block_accesses"]


def test_bench_remote_sharing_takes_requests_of_no_blocks_and_a_one_request_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sharing figure replays alternate requests in two processes: a request
    with no hash_ids is skipped, and a process whose half is empty replays nothing."""
    from _redis import server_binary

    monkeypatch.setenv("KVACTORS_REDIS_SERVER", server_binary())
    mixed = write_trace(tmp_path / "mixed.jsonl", [[1, 2], [], [1, 2]])
    one = write_trace(tmp_path / "one.jsonl", [[5]])
    expected = {mixed: 0.5, one: 0.0}  # [1, 2] twice, both in process 0: 2 hits of 4
    for path, ratio in expected.items():
        argv = ["bench", "remote", "--sizes", "16", "--mib", "1", "--repeat", "1"]
        assert main([*argv, "--trace", str(path), "--requests", "3", "--json"]) == 0
        sharing = last_json(capsys.readouterr().out)["summary"]["sharing"]
        assert sharing == {"alone": ratio, "shared": ratio}


def test_a_trace_saved_with_a_byte_order_mark_and_crlf_lines_replays(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = write_trace(tmp_path / "plain.jsonl", HAND_TRACE)
    windows = tmp_path / "windows.jsonl"
    windows.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes().replace(b"\n", b"\r\n"))
    rows = []
    for path in (plain, windows):
        assert main(["replay", str(path), "--blocks", "4", "--json"]) == 0
        rows.append(last_json(capsys.readouterr().out)["rows"])
    assert rows[0] == rows[1]


def test_python_dash_m_kvactors_is_the_kvactors_command() -> None:
    """``python -m kvactors`` runs the same CLI: its version; a bad command exits 2."""
    import kvactors

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kvactors", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    version = run("--version")
    assert version.returncode == 0, version.stderr
    assert kvactors.__version__ in version.stdout
    bad = run("no-such-command")
    assert bad.returncode == 2
    assert bad.stdout == ""


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("args", "bar"),
    [
        ([], True),
        (["--json"], False),
        (["--served"], True),
        (["--served", "--json"], False),
    ],
)
def test_replay_progress_bar_on_a_terminal_never_with_json(
    trace: Path,
    args: list[str],
    bar: bool,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """docs/replay.md: a progress bar is drawn on stderr when stderr is a terminal
    and CI is not set; never with --json; and under CI, not at all."""
    monkeypatch.delenv("CI", raising=False)
    tty = _TTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main(["replay", str(trace), "--blocks", "4", "--policy", "lru", *args]) == 0
    drawn = tty.getvalue()
    if bar:
        assert "\rbelady (MIN) [" in drawn
        assert ("\rlru (served) [" if "--served" in args else "\rlru [") in drawn
        assert drawn.endswith("\r\x1b[2K")  # the line is erased before the table
    else:
        assert drawn == ""
    out = capsys.readouterr().out
    assert out.startswith("{" if "--json" in args else "replay: hand.jsonl, 4 blocks")
    monkeypatch.setenv("CI", "true")
    tty.seek(0)
    tty.truncate()
    assert main(["replay", str(trace), "--blocks", "4", "--policy", "lru", *args]) == 0
    assert tty.getvalue() == ""


def test_replay_a_bundled_name_is_the_bundled_trace_beside_a_directory_of_that_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/replay.md: an existing *file* named like a bundled trace wins over it; a
    directory of that name does not (it was read as the trace: exit 2)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "synthetic").mkdir()
    assert main(["replay", "synthetic", "--policy", "lru", "--blocks", "4000", "--json"]) == 0
    summary = last_json(capsys.readouterr().out)["summary"]
    assert Path(summary["trace"]).name == "mooncake_synthetic.jsonl"
    assert summary["requests"] == 3993
    (tmp_path / "synthetic").rmdir()
    write_trace(tmp_path / "synthetic", HAND_TRACE)
    assert main(["replay", "synthetic", "--policy", "lru", "--blocks", "4", "--json"]) == 0
    summary = last_json(capsys.readouterr().out)["summary"]
    assert (summary["trace"], summary["requests"]) == ("synthetic", 7)


def test_replay_notes_a_policy_above_min(
    tmp_path: Path, trace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/replay.md's third counterexample through the command: prefix_admit finds 3
    leading hits, MIN 2, on a chained trace with no store refused, so neither of the
    other notes explains it; a note names the policy. None on the hand trace."""
    requests = [[7, 8, 14], [9, 10, 13], [7, 8], [0, 11, 12], [9, 10, 13]]
    path = write_trace(tmp_path / "declines.jsonl", requests)
    assert main(["replay", str(path), "--blocks", "4", "--json"]) == 0
    report = last_json(capsys.readouterr().out)
    assert report["summary"]["belady"]["hits"] == 2
    assert report["summary"]["policies"]["prefix_admit"]["hits"] == 3
    above = [note for note in report["notes"] if note.startswith("above MIN")]
    assert len(above) == 1
    assert above[0].startswith("above MIN's 2 hits: prefix_admit (3 hits).")
    assert main(["replay", str(trace), "--blocks", "4", "--json"]) == 0
    notes = last_json(capsys.readouterr().out)["notes"]
    assert not any(note.startswith("above MIN") for note in notes)


@pytest.mark.parametrize(("big", "note"), [(1, "1 request has"), (2, "2 requests have")])
def test_replay_notes_the_requests_too_big_to_store(
    tmp_path: Path, big: int, note: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A request with more blocks than the capacity is counted in a note, in words
    that agree with the count."""
    requests = [[1, 2], *([[10 * i + 3, 10 * i + 4, 10 * i + 5] for i in range(big)]), [1, 2]]
    path = write_trace(tmp_path / "big.jsonl", requests)
    assert main(["replay", str(path), "--policy", "lru", "--blocks", "2", "--json"]) == 0
    report = last_json(capsys.readouterr().out)
    assert report["summary"]["belady"]["stores_refused"] == big
    assert f"{note} more blocks than the capacity and stored nothing" in " ".join(report["notes"])


@pytest.mark.parametrize(
    "argv",
    [
        ["replay", "--bogus"],  # an option no command has
        ["replay", "--repeat", "3"],  # an option of bench policy
        ["replay", "conversation", "extra"],  # a second TRACE
        ["bench", "policy", "--served"],  # an option of replay
    ],
)
def test_an_argument_the_command_does_not_take_is_a_top_level_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """README: the top-level usage and `kvactors: error: ...`, exit status 2."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("usage: kvactors [-h] [--version] COMMAND ...\n")
    assert err.splitlines()[-1].startswith("kvactors: error: unrecognized arguments: ")


def test_replay_ratios_without_min_hits_are_a_dash_and_null(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/replay.md: `of MIN` when MIN has no hits and `of gap` when MIN has no more
    hits than LRU are `-` in the table and null in the JSON. One request: no hits."""
    path = write_trace(tmp_path / "one.jsonl", [[1, 2, 3]])
    assert main(["replay", str(path), "--blocks", "8", "--policy", "arc"]) == 0
    row = capsys.readouterr().out.splitlines()[4].split()
    assert row == ["arc", "0", "0.000", "0.000", "-", "-", "0", "0"]
    assert main(["replay", str(path), "--blocks", "8", "--policy", "arc", "--json"]) == 0
    arc = last_json(capsys.readouterr().out)["summary"]["policies"]["arc"]
    assert (arc["of_belady"], arc["of_gap"]) == (None, None)


@pytest.mark.parametrize(
    "message",
    [
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 209715200004096 bytes. Error code 12",
        "CUDA out of memory. Tried to allocate 20.00 GiB",
    ],
)
def test_a_torch_allocation_failure_is_one_out_of_memory_line_exit_1(
    message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import kvactors.cli.replay as replay

    def fail(args: object) -> None:
        raise RuntimeError(message)

    monkeypatch.setattr(replay, "run", fail)
    assert main(["replay"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "kvactors: error: out of memory (try smaller sizes)\n"


def test_a_runtime_error_that_is_not_memory_is_not_called_out_of_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import kvactors.cli.replay as replay

    def fail(args: object) -> None:
        raise RuntimeError("some other failure")

    monkeypatch.setattr(replay, "run", fail)
    with pytest.raises(RuntimeError, match="some other failure"):
        main(["replay"])


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            OSError(28, "No space left on device", "/tmp/x/blocks"),
            "No space left on device: /tmp/x/blocks",
        ),
        (PermissionError(13, "Permission denied"), "Permission denied"),
    ],
)
def test_an_os_error_during_a_command_is_one_line_exit_2(
    error: OSError, line: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import kvactors.cli.replay as replay

    def fail(args: object) -> None:
        raise error

    monkeypatch.setattr(replay, "run", fail)
    assert main(["replay"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"kvactors: error: {line}\n"
