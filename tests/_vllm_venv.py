"""The vLLM venv the end-to-end tests run their engines in (``.venv-vllm``, made by
``scripts/setup.sh --test``; ``KVACTORS_VLLM_PYTHON`` names another)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = Path(os.environ.get("KVACTORS_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


def vllm_python() -> Path:
    """The vLLM venv's interpreter; without it the test skips, except in CI, where
    it fails."""
    if not VLLM_PYTHON.exists():
        reason = f"no vLLM venv at {VLLM_PYTHON} (bash scripts/setup.sh --test makes it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return VLLM_PYTHON
