#!/usr/bin/env bash
# The whole check: lint, strict typing of src/, and the test suite (warnings are errors).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check src tests examples
.venv/bin/ruff format --check src tests examples
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
