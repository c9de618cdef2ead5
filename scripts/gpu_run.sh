#!/usr/bin/env bash
# The one GPU call (issue 10): on the lent GPU machine, with what scripts/gpu_prepare.sh
# put in .gpu-carry/ (resfast._C for torch 2.11 as a stable-ABI module, wheels the
# machine may lack), bring back the headline numbers inside a total budget.
#
#   bash scripts/gpu_run.sh [--budget S] [--plan]
#
#   --budget S  seconds for the whole run (default 450); every step is time-boxed to
#               what its plan allows and what is left, RESERVE seconds kept for the end
#   --plan      print each step's limit and check that they fit the budget; run nothing
#   --slack N   multiply the budget and every limit by N (the CPU dry run: a 2-core machine
#               is no GPU machine; what it checks is that every step runs to its end)
#
# In order (each step recorded with its status, even when killed at its limit):
#   a. setup: carried wheels unpacked where the module is missing, the carried module
#      put in place (built here with setup.py only if it does not import), the
#      environment and `resfast info`;
#   b. warm + correctness, in parallel (neither is timed): the first call of every
#      headline benchmark in its own process (resfast, then torch.compile: their cold
#      Triton and inductor compiles fill the on-disk caches the timed runs then find;
#      the cold first-call times are kept), beside the GPU correctness subset (SUBSET
#      below) as parallel pytest shards with each failure's details printed as it happens;
#   c. the headline benchmarks, timed with the GPU to themselves: ops and block, then
#      ResNet-50, then VGG-16 (each a process of its own, rows written as measured);
#   d. what fits the rest: a torch.profiler table of a ResNet-50 training step, the
#      remaining GPU tests, a training run, the pytest-benchmark suite.
# Without a GPU the same steps run at tiny sizes (the CPU dry run of
# scripts/check_gpu_stack.sh): the GPU tests then skip, and the step proves they collect.
#
# Results: ${OUT:-benchmarks/results}/<date>-<gpu>/ (at most 7 files, one folder down:
# what the device tool brings back): summary.md (also printed at the end), bench.json and
# bench.md (resfast bench: every row, the command that measured it, ratios), env.txt,
# tests.txt (the pytest output of every shard), profile.txt, logs.tar.gz (each step's log,
# the warm-up JSONs, the training metrics, the pytest-benchmark JSON).
set -uo pipefail   # no -e: a failing step is recorded and the run goes on
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
BUDGET=450
PLAN_ONLY=0
SLACK=1
while [ $# -gt 0 ]; do
  case $1 in
    --budget) BUDGET=$2; shift 2 ;;
    --plan) PLAN_ONLY=1; shift ;;
    --slack) SLACK=$2; shift 2 ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
    *) echo "gpu_run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
T0=$(date +%s)

# ---- the plan: each step's longest time, in seconds ------------------------------------
RESERVE=15          # kept for the summary at the end
L_SETUP=45          # wheels, module, environment, resfast info (a fallback build gets L_BUILD)
L_BUILD=240
L_WARM=150          # warm-up processes and the correctness shards, side by side
L_BENCH_OPS=80      # conv3x3+BN+ReLU train and eval, BN+add+ReLU, bottleneck: every provider
L_BENCH_R50=70      # ResNet-50 training step, batch 256 (warm caches; torch.compile still traces)
L_BENCH_VGG=60      # VGG-16 training step, batch 256
L_PROFILE=40        # torch.profiler table of one ResNet-50 training step
L_REST=120          # the GPU tests outside the subset
L_TRAIN=60          # resfast train --model resnet20 on the embedded digits
L_SUITE=40          # pytest-benchmark on SUITE_K
CORE=$(( L_SETUP + L_WARM + L_BENCH_OPS + L_BENCH_R50 + L_BENCH_VGG + RESERVE ))

# ---- the GPU correctness subset: chosen to need few Triton compiles --------------------
# One shard per line, run in parallel: "name|paths|-k expression" (all with -m gpu).
# Paths follow the package (tests/kernels, tests/ops, tests/nn, tests/models).
CPP="tests/kernels/test_bn_ops_cuda.py"
TRITON="tests/kernels/test_conv2d_bn.py"
OPS="tests/nn/test_conv_bn_relu.py tests/nn/test_bn_add_relu.py"
SUBSET=(
  "cuda-cpp-act|$CPP|test_bn_act"                       # the CUDA C++ kernels: no Triton
  "cuda-cpp-stats|$CPP|not test_bn_act"
  "triton|$TRITON|not float16 and not float64"         # the Triton kernels against float64
  "ops|$OPS|bfloat16 or float32"                        # fused ops against torch.nn / cuDNN
  "blocks|tests/nn/test_blocks.py|bfloat16 or float32"
  "model|tests/models/test_torchvision_equivalence.py|resnet50 and train"
)
# The rest of the GPU tests (step d), by folder.
REST=(
  "rest-ops|tests/ops tests/nn|"
  "rest-models|tests/models|"
  "rest-other|tests --ignore=tests/ops --ignore=tests/nn --ignore=tests/models|"
)

if [ "$PLAN_ONLY" = 1 ] || [ "$CORE" -gt "$BUDGET" ]; then
  echo "plan (s): setup $L_SETUP, warm+tests $L_WARM," \
       "bench $L_BENCH_OPS+$L_BENCH_R50+$L_BENCH_VGG, reserve $RESERVE = $CORE of a budget of" \
       "$BUDGET; then, as time allows: profile $L_PROFILE, rest of the GPU tests $L_REST," \
       "train $L_TRAIN, suite $L_SUITE"
  if [ "$CORE" -gt "$BUDGET" ]; then
    echo "gpu_run.sh: the core steps' limits ($CORE s) exceed the budget ($BUDGET s)" >&2; exit 1
  fi
  exit 0
fi
if [ "$SLACK" != 1 ]; then
  for v in BUDGET RESERVE L_SETUP L_BUILD L_WARM L_BENCH_OPS L_BENCH_R50 L_BENCH_VGG L_PROFILE \
           L_REST L_TRAIN L_SUITE; do
    eval "$v=\$(( $v * SLACK ))"
  done
fi

# ---- where things go -------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_run.XXXXXX")
export PYTHONUNBUFFERED=1
GPU=0
$PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null && GPU=1
gpu_name=cpu
if [ "$GPU" = 1 ]; then
  gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  [ -n "$gpu_name" ] \
    || gpu_name=$($PY -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null)
fi
SLUG=$(printf '%s' "${gpu_name:-unknown}" | tr '[:upper:]' '[:lower:]' \
       | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')
RESULTS="${OUT:-$REPO/benchmarks/results}/$(date -u +%F)-${SLUG:-unknown}"
n=1; base=$RESULTS
while [ -e "$RESULTS" ]; do n=$((n + 1)); RESULTS="$base-$n"; done   # a second run the same day
mkdir -p "$RESULTS"
STEPS=$WORK/steps.tsv
: > "$STEPS"

trap 'publish; log "stopped by a signal"; exit 143' TERM INT
log() { echo "[gpu_run +$(( $(date +%s) - T0 ))s] $*"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
record() {  # record NAME STATUS RC SECONDS LIMIT [NOTE]: one line of $STEPS
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${6:-}" >> "$STEPS"
}

publish() {  # summary and logs into $RESULTS; cheap (no torch import), run after every step
  tar -czf "$RESULTS/.logs.tar.gz" -C "$WORK" --exclude=site . 2>/dev/null \
    && mv "$RESULTS/.logs.tar.gz" "$RESULTS/logs.tar.gz"
  $PY scripts/gpu_summary.py --work "$WORK" --results "$RESULTS" --budget "$BUDGET" \
    --elapsed $(( $(date +%s) - T0 )) > /dev/null 2>"$WORK/summary.err" || true
}

# step NAME LIMIT CMD...: run CMD time-boxed to min(LIMIT, what is left less RESERVE),
# output to $WORK/NAME.log, one line in $STEPS: name status rc seconds limit
step() {
  local name=$1 want=$2; shift 2
  local limit rc status start
  limit=$(min "$want" $(( $(left) - RESERVE )))
  if [ "$limit" -lt 5 ]; then
    record "$name" skipped - 0 "$want" "budget spent"
    log "$name: skipped, budget spent"; return 0
  fi
  log "$name (limit ${limit}s): $*"
  start=$(date +%s)
  echo "\$ $*" > "$WORK/$name.log"
  timeout --kill-after=5 "$limit" "$@" >> "$WORK/$name.log" 2>&1
  rc=$?
  case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
  record "$name" "$status" "$rc" "$(( $(date +%s) - start ))" "$limit"
  log "$name: $status (rc $rc) in $(( $(date +%s) - start ))s"
  return 0
}

shard_paths() {  # the existing paths among a shard's (and its --options), one a line
  local p
  for p in $1; do
    case $p in --*) echo "$p" ;; *) [ -e "$p" ] && echo "$p" ;; esac
  done
}

pytest_shards() {  # pytest_shards LIMIT SHARD...: all shards in parallel, each a step
  local limit=$1 spec name paths k; shift
  for spec in "$@"; do
    IFS='|' read -r name paths k <<< "$spec"
    mapfile -t args < <(shard_paths "$paths")
    if ! printf '%s\n' "${args[@]}" | grep -qv '^--'; then
      record "$name" failed - 0 "$limit" "none of its paths exists: $paths"
      continue
    fi
    step "$name" "$limit" $PY -m pytest -m gpu -q -rfE --tb=short -p no:cacheprovider \
      -p scripts.live_failures "${args[@]}" ${k:+-k "$k"} &
  done
}

# resfast bench on the headline cases, bf16 autocast, channels_last; no chart (no matplotlib)
BENCH=($PY -m resfast bench --headline --dtype bf16 --layout channels_last --no-plot)

# ---- a. setup ----------------------------------------------------------------------------
log "budget ${BUDGET}s, results in $RESULTS, work in $WORK," \
    "$([ "$GPU" = 1 ] && echo "GPU: $gpu_name" || echo 'no GPU: CPU dry run at tiny sizes')"
SITE=$WORK/site
if ls .gpu-carry/wheels/*.whl >/dev/null 2>&1; then
  $PY scripts/gpu_setup.py wheels "$SITE" .gpu-carry/wheels/*.whl > "$WORK/wheels.log" 2>&1
  cat "$WORK/wheels.log"
fi
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"   # the checkout's resfast first

if [ -f .gpu-carry/_C.abi3.so ]; then
  cp .gpu-carry/_C.abi3.so resfast/_C.abi3.so
fi
if [ -z "${CUDA_HOME:-}" ]; then
  nvcc_bin=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)
  if [ -n "$nvcc_bin" ]; then  # nvcc on PATH may be a wrapper; its dry run names the toolkit root
    top=$("$nvcc_bin" --dryrun -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
    if [ -n "$top" ] && [ -d "$top" ]; then CUDA_HOME=$(cd "$top" && pwd)
    else CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$nvcc_bin")")"); fi
    export CUDA_HOME
  fi
fi
imports() {  # resfast imports, with its CUDA kernels where there is a GPU
  timeout 60 $PY -c "import resfast, sys
sys.exit(0 if resfast.info()['cuda_kernels_built'] or not $GPU else 1)" > /dev/null 2>&1
}
if ! imports; then
  log "the carried module does not import here (or has no CUDA kernels): building"
  rm -f resfast/_C.abi3.so
  step build "$L_BUILD" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" \
    $PY setup.py build_ext --inplace
fi
{
  echo "date: $(date -u +%FT%TZ)   budget: ${BUDGET}s   GPU: $GPU"
  echo "== carried module"
  cat .gpu-carry/MANIFEST.txt 2>/dev/null || echo "(no .gpu-carry/MANIFEST.txt)"
  cat "$WORK/wheels.log" 2>/dev/null
  echo "== python"; timeout 60 $PY scripts/gpu_setup.py env 2>&1
  echo "== resfast info"; timeout 60 $PY -m resfast info 2>&1
  echo "== nvcc"; command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "no nvcc on PATH"
  echo "== nvidia-smi"; timeout 20 nvidia-smi 2>&1 | head -20 || true
} > "$RESULTS/env.txt" 2>&1
setup_status=ok
imports || setup_status=failed   # then the steps below fail fast and say why in their logs
record setup "$setup_status" - "$(( $(date +%s) - T0 ))" "$L_SETUP"
grep -A14 '== resfast info' "$RESULTS/env.txt"
publish

# ---- b. warm-up and the correctness subset, side by side ---------------------------------
limit=$(min "$L_WARM" $(( $(left) - RESERVE - L_BENCH_OPS - L_BENCH_R50 - L_BENCH_VGG )))
log "warm-up and the correctness subset, in parallel (limit ${limit}s)"
for part in "ops|--sets ops blocks" "r50|--names resnet50" "vgg|--names vgg16"; do
  IFS='|' read -r tag sel <<< "$part"
  for prov in resfast compile; do
    # shellcheck disable=SC2086  # $sel is several arguments
    step "warm-$tag-$prov" "$limit" "${BENCH[@]}" $sel --providers "$prov" --warmup 1 --steps 1 \
      --rounds 1 --out "$WORK" --name "warm-$tag-$prov" &
  done
done
pytest_shards "$limit" "${SUBSET[@]}"
wait
for spec in "${SUBSET[@]}"; do cat "$WORK/${spec%%|*}.log"; done > "$RESULTS/tests.txt" 2>/dev/null
publish

# ---- c. the headline benchmarks, timed -------------------------------------------------
stop_early() { echo $(( $1 * 3 / 4 )); }  # start no new measurement past 3/4 of a step's limit
# networks: 2 warm-up steps and 3 rounds of 5 (a VGG-16 step at batch 256 is a large fraction
# of a second; the ops' 3 + 3 x 10 are milliseconds)
NETS="--warmup 2 --steps 5 --rounds 3"
for part in "bench-ops|$L_BENCH_OPS|--sets ops blocks" \
            "bench-r50|$L_BENCH_R50|--names resnet50 $NETS" \
            "bench-vgg|$L_BENCH_VGG|--names vgg16 $NETS"; do
  IFS='|' read -r name want sel <<< "$part"
  more=$([ -f "$RESULTS/bench.json" ] && echo --append)
  # shellcheck disable=SC2086
  step "$name" "$want" "${BENCH[@]}" $sel --out "$RESULTS" --name bench $more \
    --time-budget "$(stop_early "$want")"
  publish
done
if [ -f "$RESULTS/bench.json" ]; then   # the table of every row, also when a step was killed
  timeout 60 $PY -m resfast bench --report "$RESULTS/bench.json" --no-plot \
    > "$WORK/bench-table.log" 2>&1
  cat "$WORK/bench-table.log"
fi

# ---- d. what fits the rest ---------------------------------------------------------------
quick=()
[ "$GPU" = 1 ] || quick=(--warmup 1 --steps 1)
step profile "$L_PROFILE" $PY -m resfast.bench.profile resnet50/train \
  --out "$RESULTS/profile.txt" "${quick[@]}"
publish
pytest_shards "$L_REST" "${REST[@]}"
wait
for spec in "${REST[@]}"; do cat "$WORK/${spec%%|*}.log"; done >> "$RESULTS/tests.txt" 2>/dev/null
publish
tiny=()
[ "$GPU" = 1 ] || tiny=(--train-subset 256 --test-subset 128 --epochs 1 --workers 0)
for backend in resfast torch; do
  step "train-$backend" "$L_TRAIN" $PY -m resfast train --model resnet20 --amp bf16 \
    --channels-last --epochs 3 --progress off --overwrite --backend "$backend" \
    --out "$WORK/train-$backend" "${tiny[@]}"
  rm -f "$WORK/train-$backend/checkpoint.pt"   # weights: the metrics are the result
  publish
done
if [ "$GPU" = 1 ]; then
  SUITE_K=${SUITE_K:-"conv3x3_bn_relu-56x56x64-train or bn_add_relu-56x56x256-train"}
else
  SUITE_K=${SUITE_K:-"conv3x3_bn_relu-8x8x8-train or bn_add_relu-8x8x16-train"}
fi
step suite "$L_SUITE" $PY -m pytest benchmarks -q -p no:cacheprovider --bench-dtypes bf16 \
  --bench-layouts channels_last -k "$SUITE_K" --benchmark-json "$WORK/suite.json"
publish

log "done in $(( $(date +%s) - T0 ))s of ${BUDGET}s"
cat "$RESULTS/summary.md"
[ -s "$WORK/summary.err" ] && { echo "(summary script errors:)"; cat "$WORK/summary.err"; }
ls -l "$RESULTS"
rm -rf "$WORK"
exit 0
