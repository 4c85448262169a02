"""kvactors inside a real vLLM (0.32, CPU build), end to end.

A tiny Llama with random weights (std 0.1: greedy tokens depend on every KV
value), a device KV cache too small for the shared prefixes, and prompts that
revisit evicted prefixes. The engines run in the vLLM venv (``.venv-vllm``, made
by ``scripts/setup.sh --test``), one process tree each; without that venv these
tests skip, except in CI, where they fail.

Runs: no offloading (the reference tokens), kvactors CPU + NVMe in one process,
the same with loads deliberately corrupted (the control: tokens must change;
prefetch off, so NVMe hits are read by the load jobs), and kvactors in
multi-process mode (front-end, engine core, worker). With prefetch on, lookups
of blocks only NVMe holds read them into CPU before vLLM loads them.

The remote tier: the in-process run (engine A) also writes every stored block
to a Valkey server the test starts on 127.0.0.1; then engine B, a fresh
process with empty local tiers, gets its prefix hits from the server.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

from _redis import server_binary
from _vllm_venv import ROOT, vllm_python
from kvactors.media.local_server import LocalServer
from kvactors.vllm import extra_config
from kvactors.vllm.engine import EngineRunError, run_in_subprocess

pytestmark = pytest.mark.vllm

BLOCK = 32  # the CPU attention backend wants multiples of 32
ROW = 4 * 2 * BLOCK * 2 * 64 * 2  # layers x (K, V) x tokens x kv heads x head dim x bf16
PREFIX = 24 * BLOCK
ORDER = [0, 1, 2, 3, 4, 3, 4, 0, 1, 2]  # five prefixes, then revisits: recent ones, then old ones


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    prefixes = [[rng.randrange(3, 1024) for _ in range(PREFIX)] for _ in range(5)]
    return [prefixes[i] + [rng.randrange(3, 1024) for _ in range(BLOCK)] for i in ORDER]


def _kv(tmp: Path, **more: Any) -> dict[str, Any]:
    return extra_config(
        cpu_bytes=60 * ROW, nvme_bytes=256 * ROW, nvme_directory=str(tmp / "nvme"), **more
    )


def _run(python: Path, name: str, spec: dict[str, Any], multiprocess: bool) -> Any:
    try:
        return run_in_subprocess(
            str(python), spec, multiprocess=multiprocess, pythonpath=[str(ROOT / "tests")]
        )
    except EngineRunError as exc:
        pytest.fail(f"vLLM run {name!r}: {exc}")


def _tiny_model(tmp: Path) -> Path:
    """A tiny Llama (config and random weights) built in ``tmp`` by the vLLM venv."""
    model = tmp / "tiny-llama"
    subprocess.run(
        [
            str(vllm_python()),
            "-c",
            f"from kvactors.vllm.engine import build_tiny_llama; build_tiny_llama({str(model)!r})",
        ],
        check=True,
        timeout=300,
    )
    return model


def _base(model: Path) -> dict[str, Any]:
    """What every engine run of these tests shares: the model, the prompts, and 40
    device blocks (under two requests' worth: prefixes go to CPU / NVMe)."""
    return {
        "model": str(model),
        "prompts": _prompts(),
        "block_size": BLOCK,
        "kv_cache_bytes": 40 * ROW,
        "max_model_len": 1024,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    python = vllm_python()
    tmp = tmp_path_factory.mktemp("vllm")
    base = _base(_tiny_model(tmp))
    corrupt = _kv(tmp / "c", spec_name="CorruptingSpec", prefetch=False)
    corrupt["spec_module_path"] = "kvactors_corrupt_spec"
    uni = {**base, "executor": "uni"}
    with LocalServer(binary=server_binary()) as server:
        remote = {"remote_url": server.url, "remote_namespace": "e2e"}
        out = {
            "none": _run(python, "none", uni, False),
            "kv": _run(python, "kv", {**uni, "extra_config": _kv(tmp, **remote)}, False),
            # engine B: a new process, local tiers empty, the server filled by "kv"
            "remote": _run(
                python,
                "remote",
                {**uni, "extra_config": extra_config(cpu_bytes=60 * ROW, **remote)},
                False,
            ),
        }
    out["corrupt"] = _run(python, "corrupt", {**uni, "extra_config": corrupt}, False)
    out["mp"] = _run(python, "mp", {**base, "executor": "mp", "extra_config": _kv(tmp / "m")}, True)
    dump = os.environ.get("KVACTORS_E2E_RESULTS")  # where to keep the runs' figures
    if dump:
        Path(dump).write_text(json.dumps({name: run["metrics"] for name, run in out.items()}))
    return out


def _hits(run: dict[str, Any], source: str) -> float:
    return float(run["metrics"].get(f"vllm:prompt_tokens_cached_by_source{{source={source}}}", 0))


def test_no_offloading_has_no_external_hits(runs: dict[str, Any]) -> None:
    assert runs["none"]["metrics"]["vllm:external_prefix_cache_hits"] == 0


@pytest.mark.parametrize("mode", ["kv", "mp"])
def test_hits_from_the_cpu_and_the_nvme_tier(runs: dict[str, Any], mode: str) -> None:
    run = runs[mode]
    m = run["metrics"]
    assert m["vllm:external_prefix_cache_hits"] > 0
    assert _hits(run, "host") > 0, m
    assert _hits(run, "disk") > 0, m
    assert m["vllm:kvactors_cpu_load_blocks"] > 0
    assert m["vllm:kvactors_demoted_blocks"] > 0
    # NVMe blocks were read into CPU ahead of their loads, from vLLM's lookups
    assert m["vllm:kvactors_prefetched_blocks"] > 0
    assert m["vllm:kvactors_prefetch_failures"] == 0
    # fewer prompt tokens computed than without offloading
    computed = m["vllm:prompt_tokens_by_source{source=local_compute}"]
    baseline = runs["none"]["metrics"]["vllm:prompt_tokens_by_source{source=local_compute}"]
    assert computed < baseline


@pytest.mark.parametrize("mode", ["kv", "mp", "remote"])
def test_greedy_tokens_equal_a_run_without_offloading(runs: dict[str, Any], mode: str) -> None:
    assert runs[mode]["tokens"] == runs["none"]["tokens"]


def test_a_fresh_engine_hits_the_remote_tier(runs: dict[str, Any]) -> None:
    """Engine A wrote its blocks to the server; engine B, which never computed
    them, gets external prefix hits from there (vLLM 0.32 counts a remote
    store's hits as ``external_unspecified``)."""
    a = runs["kv"]["metrics"]
    assert a["vllm:kvactors_remote_store_blocks"] > 0
    m = runs["remote"]["metrics"]
    assert m["vllm:external_prefix_cache_hits"] > 0
    assert m["vllm:kvactors_remote_fetched_blocks"] > 0
    assert m["vllm:kvactors_remote_fetch_failures"] == 0
    assert _hits(runs["remote"], "external_unspecified") > 0
    computed = m["vllm:prompt_tokens_by_source{source=local_compute}"]
    assert computed < a["vllm:prompt_tokens_by_source{source=local_compute}"]


def test_corrupted_loads_change_the_tokens(runs: dict[str, Any]) -> None:
    """The control: same hits, noise instead of the loaded bytes, other tokens."""
    corrupt = runs["corrupt"]
    m = corrupt["metrics"]
    assert m["vllm:external_prefix_cache_hits"] > 0
    # prefetch off: NVMe hits promoted by the load jobs themselves
    assert m["vllm:kvactors_nvme_load_blocks"] > 0
    assert m["vllm:kvactors_promoted_blocks"] > 0
    assert m.get("vllm:kvactors_prefetched_blocks", 0) == 0
    assert _hits(corrupt, "disk") > 0
    assert corrupt["tokens"] != runs["none"]["tokens"]
