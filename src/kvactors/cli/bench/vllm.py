"""``kvactors bench vllm``: kvactors inside a real vLLM, against vLLM without offloading.

Requests come from a slice of the bundled Mooncake conversation trace: every
turn of the first multi-turn conversations among trace lines ``--start`` ..
``--start + --window`` (a conversation: the requests sharing their second
``hash_id``), ``--requests`` in all, in trace order. Each ``hash_id`` becomes ``--tokens-per-hash``
tokens (equal ids, equal token blocks; the trace's 512 tokens per id scaled
down so a 2-core CPU runs a small random Llama through it in minutes), prompts
are cut at ``--max-hashes`` ids, and each request generates ``--output``
tokens. The same requests, one at a time in trace order, go through three
engines, each started in its own process: vLLM with no offloading, with
kvactors' CPU tier, and with kvactors' CPU + NVMe tiers. The device KV cache
(``--device-blocks``) is smaller than the slice's working set.

Figures per engine: prompt tokens computed, external (offloaded) hit tokens
by tier, wall time of the requests, TTFT p50 / p99, and their ratios to the
no-offloading run. Where CUDA is available, vLLM's own CPU offloading
(``CPUOffloadingSpec``) is a fourth engine.

Copy path: the worker's gather (paged KV -> CPU pool rows) plus scatter
(rows -> paged KV) of ``--copy-blocks`` blocks of a ``--copy-layers`` x
``--copy-page`` layout like vLLM's canonical KV tensors, against one
contiguous copy of the same bytes out and back; best of ``--repeat``,
interleaved. Goal: at least 0.5x.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections import defaultdict
from typing import Any

import torch

from kvactors.cli.arguments import non_negative_int, positive_int
from kvactors.cli.bench.baseline import HostRoundTrip, sync
from kvactors.cli.report import GBPS, RATIO, Report, progress
from kvactors.errors import ConfigError
from kvactors.traces import TraceRequest, bundled_trace, load_trace
from kvactors.vllm import extra_config
from kvactors.vllm.engine import (
    EngineRunError,
    build_in_subprocess,
    find_vllm_python,
    run_in_subprocess,
)
from kvactors.vllm.paged_rows import GPUBlocks, PagedRows

__all__ = ["MIN_COPY_RATIO", "add_arguments", "copy_path", "run", "trace_prompts"]

MIN_COPY_RATIO = 0.5
"""Goal: the worker's gather + scatter GB/s over one contiguous copy's, same run."""

BENCH_MODEL: dict[str, Any] = {
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
}
BLOCK = 32  # tokens per vLLM block (the CPU attention backend wants multiples of 32)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, default, what in (
        ("--requests", 40, "requests taken from the trace"),
        ("--start", 0, "first trace line of the slice"),
        ("--window", 2000, "trace lines the slice's conversations are found in"),
        ("--tokens-per-hash", BLOCK, "tokens each trace hash_id stands for"),
        ("--max-hashes", 48, "hash_ids kept per prompt (its first ones)"),
        ("--output", 4, "tokens generated per request"),
        ("--device-blocks", 96, "vLLM's device KV cache, in blocks of 32 tokens"),
        ("--cpu-blocks", 256, "kvactors' CPU tier, in blocks"),
        ("--nvme-blocks", 4096, "kvactors' NVMe tier, in blocks (the CPU + NVMe run)"),
        ("--copy-layers", 32, "copy path: layers (KV tensors)"),
        ("--copy-page", 65536, "copy path: bytes of one block of one layer"),
        ("--copy-blocks", 32, "copy path: blocks gathered and scattered"),
        ("--repeat", 5, "copy path: interleaved runs, best kept"),
    ):
        kind = non_negative_int if flag == "--start" else positive_int
        parser.add_argument(flag, type=kind, default=default, help=f"{what} ({default})")
    parser.add_argument(
        "--nvme-dir", default=None, help="directory of the NVMe tier (default: a temporary one)"
    )
    parser.add_argument(
        "--copy-only", action="store_true", help="measure the copy path only (no vLLM runs)"
    )
    parser.add_argument(
        "--vllm-python",
        default=None,
        help="interpreter with vLLM (default: $KVACTORS_VLLM_PYTHON, this one, or .venv-vllm)",
    )


# -- requests ---------------------------------------------------------------------------


def trace_slice(
    requests: list[TraceRequest], start: int, window: int, n: int
) -> list[TraceRequest]:
    """Every turn of the first multi-turn conversations in ``requests[start:start+window]``
    (in order of their first turn), ``n`` requests in all, in trace order."""
    part = requests[start : start + window]
    turns: dict[int, list[int]] = defaultdict(list)
    for pos, r in enumerate(part):
        if len(r.hash_ids) > 1:
            turns[r.hash_ids[1]].append(pos)
    chosen: list[int] = []
    for positions in turns.values():  # dicts keep first-appearance order
        if len(positions) > 1 and len(chosen) < n:
            chosen += positions
    return [part[pos] for pos in sorted(chosen)[:n]]


def trace_prompts(
    requests: list[TraceRequest], tokens_per_hash: int, max_hashes: int, vocab: int = 1024
) -> list[list[int]]:
    """Token ids per request: each hash_id one fixed random block (equal ids, equal
    tokens), the last block cut as the request's length says, scaled."""
    blocks: dict[int, list[int]] = {}
    prompts = []
    for r in requests:
        ids = r.hash_ids[:max_hashes]
        tokens: list[int] = []
        for h in ids:
            if h not in blocks:
                rng = random.Random(h * 7919 + 17)
                blocks[h] = [rng.randrange(3, vocab) for _ in range(tokens_per_hash)]
            tokens += blocks[h]
        if len(ids) == len(r.hash_ids):  # the trace's last block may be partial
            want = -(-r.input_length * tokens_per_hash // 512)
            tokens = tokens[: max(tokens_per_hash, min(len(tokens), want))]
        prompts.append(tokens)
    return prompts


# -- copy path --------------------------------------------------------------------------


def copy_path(
    layers: int, page: int, blocks: int, repeat: int, show: bool | None
) -> dict[str, Any]:
    """Best times of the worker's gather + scatter and of a contiguous copy out and back."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    num_blocks = 2 * blocks + 1
    gen = torch.Generator().manual_seed(0)
    tensors = [
        torch.randint(-128, 128, (num_blocks, page), dtype=torch.int8, generator=gen).to(device)
        for _ in range(layers)
    ]
    rows = PagedRows(tensors, [list(range(layers))])
    pool = torch.empty(
        (blocks, rows.row_bytes), dtype=torch.uint8, pin_memory=device.type == "cuda"
    )
    ids = random.Random(1).sample(range(num_blocks), blocks)
    spec = GPUBlocks(ids, [blocks], [0])
    slots = list(range(blocks))
    nbytes = blocks * rows.row_bytes
    baseline = HostRoundTrip(nbytes, device)
    copies: list[float] = []
    trips: list[float] = []
    gc.disable()
    try:
        for _ in progress(range(repeat + 1), repeat + 1, "bench vllm: copy path", enabled=show):
            copies.append(baseline())
            t = time.perf_counter()
            rows.gather(spec, pool, slots)
            rows.scatter(spec, pool, slots)
            sync(device)
            trips.append(time.perf_counter() - t)
    finally:
        gc.enable()
    back = [t[ids[0]].view(torch.uint8) for t in tensors]
    if not torch.equal(torch.cat(back).cpu(), pool[0]):
        raise RuntimeError("copy path: the round trip changed the bytes")  # pragma: no cover
    copy_s, trip_s = min(copies[1:]), min(trips[1:])
    return {
        "device": str(device),
        "bytes": nbytes,
        "gbps": 2 * nbytes / trip_s / 1e9,
        "baseline_gbps": 2 * nbytes / copy_s / 1e9,
        "seconds": trip_s,
        "baseline_seconds": copy_s,
    }


# -- engines ----------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def _engine_summary(result: dict[str, Any]) -> dict[str, Any]:
    m = result["metrics"]
    by = "vllm:prompt_tokens_cached_by_source{source=%s}"
    ttft = result["ttft"]
    return {
        "prompt_tokens": m.get("vllm:prompt_tokens", 0.0),
        "computed_tokens": m.get("vllm:prompt_tokens_by_source{source=local_compute}", 0.0),
        "device_hit_tokens": m.get(by % "device", 0.0),
        "external_hit_tokens": m.get("vllm:external_prefix_cache_hits", 0.0),
        "cpu_hit_tokens": m.get(by % "host", 0.0),
        "nvme_hit_tokens": m.get(by % "disk", 0.0),
        "wall_s": result["wall"],
        "ttft_p50_s": _percentile(ttft, 50),
        "ttft_p99_s": _percentile(ttft, 99),
        "kvactors": {k.split("kvactors_", 1)[1]: v for k, v in m.items() if "kvactors_" in k},
    }


def run(args: argparse.Namespace) -> Report:
    """Run ``kvactors bench vllm``; raises EngineRunError without an interpreter with vLLM."""
    show: bool | None = False if args.json else None
    copy = copy_path(args.copy_layers, args.copy_page, args.copy_blocks, args.repeat, show)
    ratio = copy["gbps"] / copy["baseline_gbps"]
    copy_met = ratio >= MIN_COPY_RATIO
    rows: list[list[object]] = []
    summary: dict[str, Any] = {
        "command": "bench vllm",
        "copy_path": {**copy, "ratio_vs_baseline": ratio, "goal_met": copy_met},
        "goals": {"min_copy_ratio": MIN_COPY_RATIO},
    }
    notes: list[str] = []
    if not args.copy_only:
        engines, setup = _run_engines(args, show)
        summary["engines"] = engines
        summary["workload"] = setup
        base = engines["vllm"]
        for name, e in engines.items():
            rows.append(
                [
                    name,
                    e["computed_tokens"],
                    e["external_hit_tokens"],
                    e["cpu_hit_tokens"],
                    e["nvme_hit_tokens"],
                    e["wall_s"],
                    e["ttft_p50_s"],
                    e["ttft_p99_s"],
                    e["computed_tokens"] / base["computed_tokens"]
                    if base["computed_tokens"]
                    else None,
                    base["ttft_p50_s"] / e["ttft_p50_s"] if e["ttft_p50_s"] else None,
                    base["wall_s"] / e["wall_s"] if e["wall_s"] else None,
                    None,
                    None,
                ]
            )
        notes.append(
            f"{setup['requests']} requests ({setup['prompt_tokens']:,} prompt tokens, "
            f"{setup['output']} generated each) from trace lines {args.start}.."
            f"{args.start + args.window} (multi-turn conversations), {args.tokens_per_hash} tokens "
            f"per hash_id, one request at a time; device KV cache {args.device_blocks} blocks of "
            f"{BLOCK} tokens; kvactors CPU {args.cpu_blocks} blocks, NVMe {args.nvme_blocks}"
        )
        tiered = engines["kvactors cpu+nvme"]["kvactors"]
        notes.append(
            f"kvactors cpu+nvme: {tiered.get('prefetched_blocks', 0):,.0f} NVMe blocks read into "
            f"CPU ahead of their loads (prefetch from lookups), "
            f"{tiered.get('nvme_load_blocks', 0):,.0f} read by load jobs"
        )
        notes.append(
            "computed x and speed-ups are against vLLM without offloading, same run: "
            "computed x = prompt tokens computed / vLLM's; TTFT p50 and wall speed-up = "
            "vLLM's / this engine's"
        )
    rows.append(["copy: contiguous out+back", *[None] * 10, copy["baseline_gbps"], 1.0])
    rows.append(["copy: gather + scatter", *[None] * 10, copy["gbps"], ratio])
    notes.append(
        f"copy path ({copy['device']}): gather + scatter of {args.copy_blocks} blocks x "
        f"{args.copy_layers} layers x {args.copy_page:,} B ({copy['bytes'] / 2**20:.1f} MiB each "
        f"way) at {copy['gbps']:.2f} GB/s vs one contiguous copy out and back at "
        f"{copy['baseline_gbps']:.2f} GB/s: {ratio:.3f}x (goal >= {MIN_COPY_RATIO}x: "
        + ("met)" if copy_met else "NOT met)")
    )
    summary["all_goals_met"] = copy_met
    return Report(
        title="bench vllm: kvactors as vLLM's KV offloading backend",
        columns=[
            "engine",
            "computed tok",
            "external hit tok",
            "cpu hit tok",
            "nvme hit tok",
            "wall s",
            "TTFT p50 s",
            "TTFT p99 s",
            "computed x",
            "TTFT p50 speed-up",
            "wall speed-up",
            "GB/s",
            "x baseline",
        ],
        rows=rows,
        summary=summary,
        notes=notes,
        formats={
            "computed tok": ",.0f",
            "external hit tok": ",.0f",
            "cpu hit tok": ",.0f",
            "nvme hit tok": ",.0f",
            "wall s": ".2f",
            "TTFT p50 s": ".3f",
            "TTFT p99 s": ".3f",
            "computed x": RATIO,
            "TTFT p50 speed-up": RATIO,
            "wall speed-up": RATIO,
            "GB/s": GBPS,
            "x baseline": RATIO,
        },
    )


def _run_engines(
    args: argparse.Namespace, show: bool | None
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    import tempfile
    from pathlib import Path

    python = args.vllm_python or find_vllm_python()
    if args.vllm_python is not None and not Path(args.vllm_python).is_file():
        raise EngineRunError(f"bench vllm: --vllm-python {args.vllm_python!r} is not a file")
    if python is None:
        raise EngineRunError(
            "bench vllm: no interpreter with vLLM found; make one with "
            "`bash scripts/setup.sh --test` (.venv-vllm), or pass --vllm-python, "
            "or run with --copy-only"
        )
    requests = trace_slice(
        load_trace(bundled_trace("conversation")), args.start, args.window, args.requests
    )
    if not requests:
        raise ConfigError("bench vllm: the slice holds no multi-turn conversation")
    prompts = trace_prompts(requests, args.tokens_per_hash, args.max_hashes)
    max_len = max(len(p) for p in prompts) + args.output
    max_model_len = -(-max_len // BLOCK) * BLOCK
    row = BENCH_MODEL["num_hidden_layers"] * 2 * BLOCK * 2 * 64 * 2
    if args.device_blocks * BLOCK < max_model_len:
        raise ConfigError(
            f"--device-blocks: {args.device_blocks} blocks hold fewer than the longest "
            f"request's {max_model_len} tokens"
        )
    with tempfile.TemporaryDirectory(prefix="kvactors-bench-vllm-") as tmp:
        model = build_in_subprocess(python, Path(tmp) / "model", **BENCH_MODEL)
        nvme_dir = args.nvme_dir or str(Path(tmp) / "nvme")
        base: dict[str, Any] = {
            "model": str(model),
            "prompts": prompts,
            "max_tokens": args.output,
            "block_size": BLOCK,
            "kv_cache_bytes": args.device_blocks * row,
            "max_model_len": max_model_len,
            "executor": "uni",
        }
        configs: list[tuple[str, dict[str, Any] | None]] = [
            ("vllm", None),
            ("kvactors cpu", extra_config(cpu_bytes=args.cpu_blocks * row)),
            (
                "kvactors cpu+nvme",
                extra_config(
                    cpu_bytes=args.cpu_blocks * row,
                    nvme_bytes=args.nvme_blocks * row,
                    nvme_directory=nvme_dir,
                ),
            ),
        ]
        if torch.cuda.is_available():  # vLLM's own CPU offloading runs on CUDA only
            native = {"spec_name": "CPUOffloadingSpec", "cpu_bytes_to_use": args.cpu_blocks * row}
            configs.append(("vllm native cpu", native))
        engines: dict[str, dict[str, Any]] = {}
        for name, cfg in progress(configs, len(configs), "bench vllm: engines", enabled=show):
            result = run_in_subprocess(python, {**base, "extra_config": cfg})
            engines[name] = _engine_summary(result)
    setup = {
        "requests": len(prompts),
        "prompt_tokens": sum(len(p) for p in prompts),
        "output": args.output,
        "tokens_per_hash": args.tokens_per_hash,
        "device_blocks": args.device_blocks,
        "cpu_blocks": args.cpu_blocks,
        "nvme_blocks": args.nvme_blocks,
        "model": BENCH_MODEL,
    }
    return engines, setup
