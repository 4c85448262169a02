#!/usr/bin/env bash
# The whole check: lint, strict typing of src/, and the test suite (warnings are errors).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check src tests examples
.venv/bin/ruff format --check src tests examples
.venv/bin/mypy
# The vLLM end-to-end tests (tests/test_vllm_engine.py) start their engines with this
# interpreter (.venv-vllm, made by setup.sh --test); without it they skip, with CI=true they fail.
export KVACTORS_VLLM_PYTHON="${KVACTORS_VLLM_PYTHON:-$PWD/.venv-vllm/bin/python}"
.venv/bin/python -m pytest -q "$@"
