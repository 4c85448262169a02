"""Real vLLM runs for the end-to-end tests and ``kvactors bench vllm``.

:func:`build_tiny_llama` writes a small Llama (``config.json`` and random
``safetensors`` weights, std 0.1, so greedy tokens depend on every KV value;
vLLM's ``load_format="dummy"`` weights are too flat for that) and
:func:`run_prompts` runs token-id prompts through one vLLM engine, one
request after another or in batches, and returns the tokens, per-request
timings and the engine's prefix-cache and kvactors counters.

:func:`main` (``python -m kvactors.vllm.engine CONFIG.json``) does one run in
a fresh process and prints a JSON line: every engine start is its own process,
as vLLM expects.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kvactors.errors import KVActorsError

__all__ = [
    "TINY_LLAMA",
    "EngineRunError",
    "build_in_subprocess",
    "build_tiny_llama",
    "find_vllm_python",
    "main",
    "run_in_subprocess",
    "run_prompts",
]

_ROOT = Path(__file__).resolve().parents[3]


class EngineRunError(KVActorsError):
    """A vLLM run failed, or no interpreter with vLLM was found."""


def find_vllm_python() -> str | None:
    """An interpreter that imports vLLM: ``$KVACTORS_VLLM_PYTHON`` (if it exists), this one, or the
    checkout's ``.venv-vllm`` (made by ``scripts/setup.sh --test``); ``None`` if none."""
    env = os.environ.get("KVACTORS_VLLM_PYTHON")
    if env and Path(env).exists():
        return env
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    venv = _ROOT / ".venv-vllm" / "bin" / "python"
    return str(venv) if venv.exists() else None


def build_in_subprocess(python: str, directory: str | Path, **overrides: Any) -> Path:
    """:func:`build_tiny_llama` run by ``python`` (which has ``safetensors``, as vLLM's
    environment does)."""
    code = (
        "import json, sys; from kvactors.vllm.engine import build_tiny_llama; "
        "build_tiny_llama(sys.argv[1], **json.loads(sys.argv[2]))"
    )
    try:
        proc = subprocess.run(
            [python, "-c", code, str(directory), json.dumps(overrides)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    except OSError as exc:  # not an interpreter (not executable, wrong format)
        raise EngineRunError(f"cannot run {python!r}: {exc.strerror}") from exc
    if proc.returncode != 0:
        raise EngineRunError(
            f"building the model with {python!r} failed (exit {proc.returncode}):\n"
            f"{proc.stderr[-2000:]}"
        )
    return Path(directory)


def run_in_subprocess(
    python: str,
    spec: dict[str, Any],
    *,
    multiprocess: bool = False,
    pythonpath: list[str] | None = None,
    timeout: float = 1800,
) -> dict[str, Any]:
    """:func:`run_prompts` with the keyword arguments ``spec``, in a fresh ``python``
    process (``multiprocess``: vLLM's default front-end / engine-core split, else
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0``). Raises :class:`EngineRunError` with the
    end of its stderr when it fails."""
    env = dict(os.environ)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocess else "0"
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([*pythonpath, env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory(prefix="kvactors-vllm-") as tmp:
        path = Path(tmp) / "spec.json"
        path.write_text(json.dumps(spec))
        try:
            proc = subprocess.run(
                [python, "-m", "kvactors.vllm.engine", str(path)],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                cwd=tmp,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise EngineRunError(f"vLLM run timed out after {timeout:.0f} s") from exc
        except OSError as exc:
            raise EngineRunError(f"cannot run {python!r}: {exc.strerror}") from exc
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr[-4000:]
        raise EngineRunError(f"vLLM run failed (exit {proc.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return result


TINY_LLAMA: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 1024,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def build_tiny_llama(directory: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a random Llama into ``directory`` (kept if already there); returns it."""
    from safetensors.torch import save_file

    path = Path(directory)
    cfg = {**TINY_LLAMA, **overrides}
    marker = path / "config.json"
    if marker.exists() and json.loads(marker.read_text()) == cfg:
        return path
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * 0.1).to(torch.bfloat16)

    weights = {"model.embed_tokens.weight": w(v, h), "lm_head.weight": w(v, h)}
    weights["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "self_attn.q_proj.weight": w(q, h),
            p + "self_attn.k_proj.weight": w(kv, h),
            p + "self_attn.v_proj.weight": w(kv, h),
            p + "self_attn.o_proj.weight": w(h, q),
            p + "mlp.gate_proj.weight": w(inter, h),
            p + "mlp.up_proj.weight": w(inter, h),
            p + "mlp.down_proj.weight": w(h, inter),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        }
    save_file(weights, str(path / "model.safetensors"))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    marker.write_text(json.dumps(cfg))
    return path


def _metrics(llm: Any) -> dict[str, float]:
    """Counters and gauges of prefix caching, prompt tokens and kvactors, by name;
    labelled series also as ``name{label=value}`` (e.g. cached tokens by source)."""
    out: dict[str, float] = {}
    for metric in llm.get_metrics():
        name = metric.name
        if not ("kvactors" in name or "prefix_cache" in name or "prompt_tokens" in name):
            continue
        value = getattr(metric, "value", None)
        if not isinstance(value, int | float):
            continue
        out[name] = out.get(name, 0.0) + float(value)
        extra = {k: v for k, v in metric.labels.items() if k not in ("engine", "model_name")}
        if extra:
            label = ",".join(f"{k}={v}" for k, v in sorted(extra.items()))
            key = f"{name}{{{label}}}"
            out[key] = out.get(key, 0.0) + float(value)
    return out


def run_prompts(
    model: str,
    prompts: list[list[int]],
    *,
    extra_config: dict[str, Any] | None = None,
    max_tokens: int = 8,
    batches: list[list[int]] | None = None,
    kv_cache_bytes: int = 2 << 20,
    block_size: int = 16,
    max_model_len: int = 4096,
    executor: str | None = None,
) -> dict[str, Any]:
    """Run ``prompts`` (token ids) greedily through one vLLM engine.

    ``extra_config``: the ``kv_connector_extra_config`` of an ``OffloadingConnector``
    (``None``: no offloading). ``batches``: prompt indices submitted together, in
    order (default: one request at a time). Returns ``tokens`` (per prompt),
    ``ttft`` and ``latency`` (seconds, per prompt), ``wall`` and ``metrics``.
    """
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kwargs: dict[str, Any] = {}
    if executor is not None:
        kwargs["distributed_executor_backend"] = executor
    if extra_config is not None:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="OffloadingConnector",
            kv_role="kv_both",
            kv_connector_extra_config=extra_config,
        )
    llm = LLM(
        model=model,
        skip_tokenizer_init=True,
        dtype="bfloat16",
        block_size=block_size,
        max_model_len=max_model_len,
        kv_cache_memory_bytes=kv_cache_bytes,
        enable_prefix_caching=True,
        disable_log_stats=False,
        seed=0,
        **kwargs,
    )
    params = SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False
    )
    order = batches if batches is not None else [[i] for i in range(len(prompts))]
    tokens: list[list[int]] = [[] for _ in prompts]
    ttft = [0.0] * len(prompts)
    latency = [0.0] * len(prompts)
    start = time.perf_counter()
    for batch in order:
        t0 = time.perf_counter()
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=prompts[i]) for i in batch], params, use_tqdm=False
        )
        t1 = time.perf_counter()
        for i, out in zip(batch, outs):
            tokens[i] = list(out.outputs[0].token_ids)
            m = out.metrics
            first = getattr(m, "first_token_latency", None) if m is not None else None
            ttft[i] = float(first) if first else t1 - t0
            latency[i] = t1 - t0
    wall = time.perf_counter() - start
    metrics = _metrics(llm)
    del llm
    return {"tokens": tokens, "ttft": ttft, "latency": latency, "wall": wall, "metrics": metrics}


def main(argv: list[str] | None = None) -> int:
    """``python -m kvactors.vllm.engine CONFIG.json``: :func:`run_prompts` with the
    keyword arguments in the file; prints one JSON line (prefixed ``RESULT ``)."""
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text())
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    result = run_prompts(**spec)
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
