# The lent GPU machine's software, in one place; sourced by gpu_prepare.sh and
# check_gpu_stack.sh (not run by itself).
#
# That machine (the device tool's KINDS.md and issue 10, as last seen): Python 3.12,
# torch 2.11.0+cu130, triton 3.6.0, torchvision 0.26.0, numpy 2.5.2, pytest,
# pytest-benchmark, ninja, pybind11, setuptools, cmake, nvcc 13.0; no package
# registry. What it may lack (tqdm, matplotlib, mlxtend, the cuDNN frontend) travels
# as wheels in the carry folder.
#
# gpu_stack_venv [PY] makes (or reuses) a venv here with those versions and nothing
# else: a CPU-only stand-in for that machine. PyPI's torch 2.11.0 for Linux x86_64 is
# the +cu130 build (version.py says so), with the CUDA 13 runtime wheels it needs to
# import. PyPI has no numpy 2.5; 2.4.6 is the nearest (like 2.5, >= 2.4, where
# Triton 3.6's interpreter cannot run: triton-lang/triton#9171).

GPU_PYTHON_VERSION=3.12
GPU_TORCH=2.11.0
GPU_TRITON=3.6.0
GPU_TORCHVISION=0.26.0
GPU_NUMPY=2.4.6            # the GPU machine has 2.5.2, which PyPI does not serve
SUITE_NUMPY='numpy<2.4'    # the CPU test suite: Triton 3.6's interpreter needs numpy < 2.4
GPU_STACK_VENV=${RESFAST_GPU_STACK_VENV:-$HOME/.cache/resfast/gpu-stack-torch$GPU_TORCH}

# What the GPU machine has besides torch (its pip list; only what resfast's run uses).
GPU_STACK_PACKAGES=("torch==$GPU_TORCH" "triton==$GPU_TRITON" "torchvision==$GPU_TORCHVISION"
                    "numpy==$GPU_NUMPY" pytest pytest-benchmark ninja pybind11 cmake
                    "setuptools<82")

gpu_stack_venv() {  # gpu_stack_venv [python]: make or reuse $GPU_STACK_VENV (silent on reuse)
  local py=${1:-python3} stamp="$GPU_STACK_VENV/.resfast-stack"
  local want="${GPU_STACK_PACKAGES[*]}"
  if [ -x "$GPU_STACK_VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  echo "[gpu_stack] making $GPU_STACK_VENV: ${GPU_STACK_PACKAGES[*]} (about 3 GB of wheels)" >&2
  rm -rf "$GPU_STACK_VENV"
  "$py" -m venv "$GPU_STACK_VENV" || return 1
  # pip.conf here caps torch at this machine's own release; 2.11 is below the cap.
  "$GPU_STACK_VENV/bin/python" -m pip install -q --upgrade pip || return 1
  "$GPU_STACK_VENV/bin/python" -m pip install -q "${GPU_STACK_PACKAGES[@]}" || return 1
  "$GPU_STACK_VENV/bin/python" - <<PY || return 1
import importlib
for mod, want in (("torch", "$GPU_TORCH"), ("triton", "$GPU_TRITON"),
                  ("torchvision", "$GPU_TORCHVISION")):
    got = importlib.import_module(mod).__version__
    assert got.split("+")[0] == want, f"{mod} {got} installed, {want} wanted"
for mod in ("tqdm", "matplotlib", "mlxtend", "cudnn", "wheel"):
    try:
        importlib.import_module(mod)
    except ImportError:
        continue
    raise SystemExit(f"{mod} is importable in the GPU-stack venv; the GPU machine may not have it")
PY
  echo "$want" > "$stamp"
}

sent_files() {  # NUL-separated: what a device call sends (tracked files that exist, and
                #  untracked files git does not ignore)
  git ls-files -co --exclude-standard -z | while IFS= read -r -d '' f; do
    [ -e "$f" ] && printf '%s\0' "$f"
  done
}
