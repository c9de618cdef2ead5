"""The build: which CUDA archs setup.py compiles for, its nvcc flags (and CMake's), and
what the built extension's GPU code is.

setup.py is loaded under another name than __main__, which defines its functions without
building anything.
"""
import os
import re
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import resfast  # noqa: F401  (loads resfast._C)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    return runpy.run_path(str(ROOT / "setup.py"), run_name="resfast_setup")


def test_default_archs_without_a_gpu(setup_py, monkeypatch):
    """The GPUs people train on, A100 (8.0), A10 / RTX 30 (8.6), L40S / RTX 40 (8.9), H100 /
    H200 (9.0), and PTX that newer GPUs (B200, RTX 50) compile at load time."""
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert setup_py["cuda_archs"]() == "8.0;8.6;8.9;9.0+PTX"


def test_visible_gpu_arch(setup_py, monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert setup_py["cuda_archs"]() == "8.6"


def test_arch_list_from_the_environment(setup_py, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert setup_py["cuda_archs"]() == "9.0"


def test_no_fast_math(setup_py):
    """--use_fast_math flushes denormals and approximates division and square roots in the
    BatchNorm kernels: neither build asks for it."""
    assert "--use_fast_math" not in setup_py["NVCC_FLAGS"]
    cmake = [line for line in (ROOT / "CMakeLists.txt").read_text().splitlines()
             if not line.lstrip().startswith("#")]
    assert not any("fast_math" in line for line in cmake)


def _cuobjdump():
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def _dump(tool, what, library):
    out = subprocess.run([tool, what, str(library)], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, LC_ALL="C"))
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_built_kernels_are_not_fast_math():
    """The GPU code in the extension this run imports. --use_fast_math (-ftz=true) turns
    every float multiply and fma into its denormal-flushing .FTZ form (measured: hundreds of
    FMUL.FTZ / FFMA.FTZ in a build with it, none without; the compiler's exact division and
    square root keep FTZ additions and comparisons of their own in either build), and in
    the PTX also divisions and square roots into approximations."""
    if torch.ops.resfast.build_info() == "cuda_archs=" or not torch.version.cuda:
        pytest.skip("this build of resfast has no CUDA kernels")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (Triton's NVIDIA backend ships one)")
    library = next(Path(resfast.__file__).parent.glob("_C*.so"), None)
    assert library is not None, "resfast._C is not a file next to the package"
    sass = _dump(tool, "-sass", library)
    assert "Function" in sass, "no GPU functions found in the extension"
    flushing = sorted(set(re.findall(r"\bF(?:MUL|FMA)\.FTZ[.A-Z0-9]*", sass)))
    assert not flushing, f"denormal-flushing arithmetic in the kernels: {flushing}"
    ptx = _dump(tool, "-ptx", library)  # present where the build adds PTX (+PTX archs)
    approximate = sorted(set(re.findall(
        r"\b(?:(?:mul|fma|add|sub)(?:\.rn)?\.ftz\.f32|div\.(?:approx|full)[.a-z]*\.f32|"
        r"sqrt\.approx[.a-z]*\.f32)\b", ptx)))
    assert not approximate, f"fast-math instructions in the PTX: {approximate}"
