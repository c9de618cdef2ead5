"""The Triton conv kernels compile for the H100 (sm_90), checked without a GPU.

The interpreter tests (tests/kernels/test_conv2d_bn.py, tests/ops/test_conv_paths.py) prove
what the kernels compute, but the interpreter never compiles them: a dot the
compiler rejects, a dtype it cannot lower, a tile that does not fit shared
memory would only show on a GPU. Here Triton compiles each kernel, at the tile
sizes, warps and pipeline depths the GPU launchers choose, to an sm_90 cubin
with the ptxas it ships (tests/kernels/conv2d_bn_sm90.py, in one separate process without
TRITON_INTERPRET), knowing which integer arguments are multiples of 16 as a
launch on ResNet-50's shapes would. Checked: the compile succeeds, the kernel
fits an H100's shared memory, its loads are software-pipelined (asynchronous
copies to shared memory: otherwise each tile waits for its loads; whether a
load can be depends on those hints), and half-precision dots become Hopper's
warpgroup MMA (wgmma), float32 and float64 ones do not (IEEE float32 and
float64 have no wgmma form), and where a forward has no prologue to apply (the plain
1x1 and the stem) the MMA reads x's tile from shared memory, not from registers. The
small kernels that finish a conv (statistics merge, sum of wgrad partials) compile too.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernels.conv2d_bn_sm90 import FINISHING, SM90_SHARED_BYTES, VARIANTS

ROOT = Path(__file__).resolve().parents[2]


def _nvidia_backend() -> bool:
    try:
        import triton.backends
    except ImportError:
        return False
    return "nvidia" in getattr(triton.backends, "backends", {})


pytestmark = pytest.mark.skipif(not _nvidia_backend(),
                                reason="needs Triton with its NVIDIA backend")


@pytest.fixture(scope="module")
def compiled():
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.conv2d_bn_sm90"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {line["variant"]: line for line in lines}


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiles_for_sm90(compiled, variant):
    result = compiled.get(variant)
    assert result is not None, f"{variant}: no result from tests/kernels/conv2d_bn_sm90.py"
    assert result["ok"], f"{variant} does not compile for sm_90: {result['error']}"
    assert result["cubin_bytes"] > 0
    assert result["shared"] <= SM90_SHARED_BYTES, (
        f"{variant} needs {result['shared']} bytes of shared memory, an H100 block has "
        f"{SM90_SHARED_BYTES} (tiles {result['blocks']}, {result['options']})")
    assert result["async_copies"] > 0, f"{variant}: no load is pipelined (tiles {result['blocks']})"
    kernel, dtype, shape = variant.split("-", 2)
    half = dtype in ("bf16", "fp16")
    assert result["wgmma"] == half, (
        f"{variant}: {'no' if half else 'a'} warpgroup MMA in the compiled kernel (tiles "
        f"{result['blocks']})")
    if half and kernel == "forward" and not shape.endswith("-fused"):
        # nothing to apply to x: its tile goes from memory to shared memory to the MMA,
        # without the round trip through registers that a prologue needs
        assert result["a_from_shared"], f"{variant}: the MMA takes x's tile from registers"


@pytest.mark.parametrize("variant", FINISHING)
def test_finishing_kernels_compile_for_sm90(compiled, variant):
    result = compiled.get(variant)
    assert result is not None, f"{variant}: no result from tests/kernels/conv2d_bn_sm90.py"
    assert result["ok"], f"{variant} does not compile for sm_90: {result['error']}"
    assert result["cubin_bytes"] > 0 and result["shared"] <= SM90_SHARED_BYTES
