"""kvactors' ``OffloadingManager`` gives vLLM 0.32's ``CPUOffloadingManager``'s
answers (``lru``, ``arc``) call for call: ``tests/_vllm_manager_diff.py`` runs
the random sequences in the vLLM venv."""

from __future__ import annotations

import os
import subprocess

import pytest

from _vllm_venv import ROOT, vllm_python

pytestmark = pytest.mark.vllm


def test_managers_match_vllms_cpu_manager() -> None:
    python = vllm_python()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [str(python), str(ROOT / "tests" / "_vllm_manager_diff.py"), "60"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok"), proc.stdout[-3000:]
