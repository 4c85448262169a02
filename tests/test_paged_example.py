"""examples/tiny_transformer.py at its small size: generation through offloading, bit for bit."""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import anyio
import pytest
import torch

from kvactors.keys import Key

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny_transformer.py"


@pytest.fixture(scope="module")
def tt() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("tiny_transformer", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["tiny_transformer"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["tiny_transformer"]


def test_logits_equal_the_dense_reference_while_blocks_go_out_and_back(tt: ModuleType) -> None:
    """The small workload offloads, loads, swaps and defragments, and every logit of
    every step equals the dense run's, bit for bit."""
    opts = tt.SMALL
    offloader = tt.InMemoryOffloader(tt.cache_config(opts).offload_bytes)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = anyio.run(tt.run, opts, offloader)
    finally:
        torch.set_num_threads(threads)
    assert result.mismatches() == []
    rows = [
        (r.rid, len(r.prompt), r.shared, r.loaded, r.swaps, r.swapped_in, len(r.logits))
        for r in result.requests
    ]
    assert rows == [
        ("A0", 19, 0, 0, 0, 0, 8),
        ("A1", 21, 16, 0, 0, 0, 8),
        ("B0", 18, 0, 0, 0, 0, 8),
        ("B1", 21, 8, 8, 0, 0, 8),  # half the prefix was loaded back from the offloader
        ("C0", 21, 0, 0, 1, 14, 8),  # preempted, then swapped back in
        ("C1", 20, 12, 4, 0, 0, 8),
    ]
    assert result.counters == {
        "pressure_events": 10,
        "offload_blocks_stored": 23,
        "offload_blocks_loaded": 7,
        "blocks_evicted": 18,
        "store_failures": 0,
        "load_failures": 0,
        "swap_outs": 1,
        "defragments": 7,
        "moved_blocks": 1,
        "steps": 21,
    }


def test_main_prints_the_table_and_exits_0(
    tt: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tt.main(["--small"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == [
        "request", "prompt", "shared", "loaded", "swaps", "swapped", "in", "computed", "steps",
        "logits",
    ]  # fmt: skip
    assert out.count(" equal\n") == 6
    assert re.search(r"^offloader +KVCache$", out, re.M)  # the coordinator, by default
    assert out.rstrip().endswith("all logits equal the dense reference bit for bit")


def test_a_corrupted_block_is_caught_and_exits_1(
    tt: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    """The comparison is sensitive: one flipped bit in a loaded block fails the run."""

    class Corrupting(tt.InMemoryOffloader):  # type: ignore[name-defined,misc]
        async def load(self, keys: Sequence[Key], dst: torch.Tensor) -> None:
            await super().load(keys, dst)
            dst[0, 3] ^= 0x40  # a high bit of the first key element of the first row

    offloader = Corrupting(tt.cache_config(tt.SMALL).offload_bytes)
    assert tt.main(["--small"], offloader) == 1
    out = capsys.readouterr().out
    assert "DIFFER" in out
    assert "MISMATCH: logits differ from the dense reference for" in out


def test_the_command_in_the_docs_runs_from_the_checkout_root() -> None:
    """docs/paged.md: ``python examples/tiny_transformer.py --small``, in a process of
    its own, prints the table and exits 0."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "examples/tiny_transformer.py", "--small"],
        cwd=EXAMPLE.parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("all logits equal the dense reference bit for bit")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--layers", "0"], "argument --layers: must be positive, got 0"),
        (["--gpu-blocks", "0"], "argument --gpu-blocks: must be positive, got 0"),
        (["--block-size", "-4"], "argument --block-size: must be positive, got -4"),
        (["--families", "0"], "argument --families: must be positive, got 0"),
        (["--prompts-per-family", "0"], "argument --prompts-per-family: must be positive"),
        (["--max-running", "0"], "argument --max-running: must be positive, got 0"),
        (["--generate", "0"], "argument --generate: must be positive, got 0"),
        (["--prefix", "-1"], "argument --prefix: must be >= 0, got -1"),
        (["--defrag-every", "-1"], "argument --defrag-every: must be >= 0, got -1"),
        (["--seed", str(2**64)], f"argument --seed: must be in {-(2**63)}..{2**63 - 2}, got"),
        (["--seed", "x"], "argument --seed: not an int: 'x'"),
        (["--heads", "3"], "--heads 3 is not a multiple of --kv-heads 2"),
        (["--kv-heads", "3"], "--heads 4 is not a multiple of --kv-heads 3"),
        # --small: prompts of up to 16 + 5 tokens, 8 generated, blocks of 4 tokens.
        (
            ["--gpu-blocks", "6"],
            "--gpu-blocks 6 cannot hold one request of up to 29 tokens: it needs 7 blocks",
        ),
        (["--prefix", "600", "--gpu-blocks", "400"], "longer than the model's 512 positions"),
    ],
)
def test_a_size_the_example_cannot_run_is_a_usage_error(
    tt: ModuleType, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    """Exit status 2 and a message naming the option, before any work (these used to
    end in a traceback from the model, the config or the allocator, or, for zero
    prompts, in a vacuous "all logits equal")."""
    with pytest.raises(SystemExit) as exc:
        tt.main(["--small", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_the_smallest_pool_the_example_accepts_runs(tt: ModuleType) -> None:
    """The bound of the --gpu-blocks check is exact for --small: 7 blocks run."""
    assert tt.main(["--small", "--gpu-blocks", "7", "--max-running", "1"]) == 0
