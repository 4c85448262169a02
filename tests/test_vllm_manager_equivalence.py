"""kvactors' ``OffloadingManager`` gives vLLM 0.32's ``CPUOffloadingManager``'s
answers (``lru``, ``arc``) call for call: ``tests/_vllm_manager_diff.py`` runs
the random sequences in the vLLM venv."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = Path(os.environ.get("KVACTORS_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))

pytestmark = pytest.mark.vllm


def test_managers_match_vllms_cpu_manager() -> None:
    if not VLLM_PYTHON.exists():
        reason = f"no vLLM venv at {VLLM_PYTHON} (bash scripts/setup.sh --test makes it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [str(VLLM_PYTHON), str(ROOT / "tests" / "_vllm_manager_diff.py"), "60"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok"), proc.stdout[-3000:]
