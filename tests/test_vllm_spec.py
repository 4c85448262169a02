"""The vLLM-facing spec class (``kvactors.vllm.spec``) in the vLLM venv, without an
engine: what vLLM's front-end calls before any engine exists.

One interpreter of the vLLM venv runs every case (importing vLLM takes seconds)
and prints one JSON line of outcomes.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest

from _vllm_venv import ROOT, vllm_python

pytestmark = pytest.mark.vllm

SCRIPT = r"""
import json, sys
from kvactors.vllm.spec import KVActorsOffloadingSpec

out = {}
for name, extra in json.loads(sys.argv[1]).items():
    try:
        defs = KVActorsOffloadingSpec.build_metric_definitions(extra)
        out[name] = {"ok": sorted(defs)}
    except Exception as exc:
        out[name] = {"error": type(exc).__name__, "message": str(exc)}
print("RESULT " + json.dumps(out))
"""

CASES: dict[str, dict[str, Any]] = {
    "cpu": {"cpu_bytes": 1 << 20},
    "nvme": {"cpu_bytes": 1 << 20, "nvme_bytes": "4096"},
    "bad_nvme_bytes": {"cpu_bytes": 1 << 20, "nvme_bytes": "1e3"},
    "bool_nvme_bytes": {"cpu_bytes": 1 << 20, "nvme_bytes": True},
    "typo": {"cpu_bytes": 1 << 20, "nvme_byte": 4096},
    "no_cpu_bytes": {"nvme_bytes": 4096},
}


@pytest.fixture(scope="module")
def outcomes() -> dict[str, Any]:
    python = vllm_python()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    cases = {
        name: {"spec_module_path": "kvactors.vllm", "spec_name": "KVActorsOffloadingSpec", **c}
        for name, c in CASES.items()
    }
    proc = subprocess.run(
        [str(python), "-c", SCRIPT, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert lines, proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return result


def test_metric_definitions_follow_the_settings(outcomes: dict[str, Any]) -> None:
    cpu = outcomes["cpu"]["ok"]
    nvme = outcomes["nvme"]["ok"]
    assert "vllm:kvactors_cpu_usage" in cpu
    assert "vllm:kvactors_nvme_usage" not in cpu
    assert set(nvme) - set(cpu) == {"vllm:kvactors_nvme_usage"}  # a numeric string counts


@pytest.mark.parametrize(
    ("case", "key"),
    [
        ("bad_nvme_bytes", "nvme_bytes"),
        ("bool_nvme_bytes", "nvme_bytes"),
        ("typo", "nvme_byte"),
        ("no_cpu_bytes", "cpu_bytes"),
    ],
)
def test_metric_definitions_check_the_settings_as_the_engine_does(
    outcomes: dict[str, Any], case: str, key: str
) -> None:
    got = outcomes[case]
    assert got.get("error") == "ConfigError", got
    assert f"kv_connector_extra_config[{key!r}]" in got["message"]
