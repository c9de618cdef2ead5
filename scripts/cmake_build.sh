#!/usr/bin/env bash
# Build resfast's ops as a plain libtorch library with CMake (see CMakeLists.txt).
#   scripts/cmake_build.sh [cpu|cuda] [build-dir]
# CUDA needs CUDA_HOME (found from nvcc when unset) and builds for
# TORCH_CUDA_ARCH_LIST (default 9.0), never for the local GPU.
set -euo pipefail
mode=${1:-cpu}
build=${2:-build/cmake-$mode}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  # nvcc on PATH may be a wrapper script; its dry run names the real toolkit root.
  CUDA_HOME=$(cd "$(nvcc --dryrun -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)" && pwd)
fi
read -r torch_prefix wheels < <(python3 - <<'PY'
import os, torch
print(torch.utils.cmake_prefix_path, os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13"))
PY
)
args=(-S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$torch_prefix")
# the CPU loops' instruction sets besides DEFAULT, comma-separated as for setup.py
# (default AVX2,AVX512; "none" for DEFAULT alone)
if [ -n "${RESFAST_CPU_ISAS:-}" ]; then
  isas=$(echo "$RESFAST_CPU_ISAS" | tr ',' ';')
  [ "$isas" = none ] && isas=""
  args+=(-DRESFAST_CPU_ISAS="$isas")
fi
# torch's CUDA build asks for the toolkit even for a CPU-only library.
if [ -n "${CUDA_HOME:-}" ]; then
  args+=(-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" -DCUDAToolkit_ROOT="$CUDA_HOME")
  if [ -d "$wheels/lib" ]; then
    args+=(-DCUDA_NVRTC_LIB="$wheels/lib/libnvrtc.so.13" -DRESFAST_EXTRA_INCLUDE="$wheels/include")
    export LIBRARY_PATH="$wheels/lib:${LIBRARY_PATH:-}"
  fi
fi
if [ "$mode" = cuda ]; then
  archs=$(echo "${TORCH_CUDA_ARCH_LIST:-9.0}" | tr -d '.' | tr ' ' ';')
  args+=(-DRESFAST_WITH_CUDA=ON -DRESFAST_CUDA_ARCHS="$archs" -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc")
fi
cmake "${args[@]}"
cmake --build "$build" -j "${MAX_JOBS:-2}"
echo "built $(ls "$build"/libresfast_ops.so)"
