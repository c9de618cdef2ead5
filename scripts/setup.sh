#!/usr/bin/env bash
# Install resfast and its dependencies on a fresh machine and build the extension.
#   bash scripts/setup.sh
# Installs torch first (the CUDA 13 build, which can compile .cu files even
# without a GPU), then builds resfast._C against it without build isolation, so
# pip never fetches a second torch. The CUDA kernels are built when a toolkit
# is found (RESFAST_SKIP_CUDA=1 skips them), for TORCH_CUDA_ARCH_LIST (default:
# setup.py's, the visible GPU's arch or, without one, 8.0 8.6 8.9 9.0+PTX).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! $PY -c "import torch, torchvision" 2>/dev/null; then
  $PY -m pip install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
fi
# The build's own tools (it runs without build isolation, against the installed torch).
$PY -m pip install -q setuptools wheel ninja pybind11 cmake

if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  # nvcc on PATH may be a wrapper script; its dry run names the real toolkit root.
  CUDA_HOME=$(cd "$(nvcc --dryrun -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)" && pwd)
  export CUDA_HOME
fi
# resfast with what pyproject.toml declares for it and its tests (timm, ruff ...); the
# torch installed above satisfies its torch requirement, so pip fetches no other.
$PY -m pip install -q --no-build-isolation -e ".[test]"
$PY -m resfast info
