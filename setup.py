"""Build resfast._C: the C++ op schemas and CPU kernels always, the CUDA kernels
when a CUDA toolkit and a CUDA build of torch are present.

Environment:
  RESFAST_SKIP_CUDA=1       build the CPU part only
  TORCH_CUDA_ARCH_LIST      CUDA archs to build for. Default: the visible GPU's arch
                            when there is one, else DEFAULT_ARCHS, the GPUs people
                            train on (A100, A10/RTX 30, L40S/RTX 40, H100/H200) plus
                            PTX for newer ones; no GPU is ever required. On a GPU the
                            build has no image for, the ops fall back to ATen with
                            one warning (csrc/cuda/fallback.h)
  CUDA_HOME                 the toolkit root
  MAX_JOBS                  parallel compile jobs (default: from cores and memory)
  RESFAST_PY_LIMITED_API=1  build against Python's stable ABI (resfast/_C.abi3.so): one
                            module for every CPython >= 3.10, such as one built here with
                            3.11 for a GPU machine's 3.12 (scripts/gpu_prepare.sh). The
                            extension's only Python API call is PyModule_Create2, which
                            the stable ABI has; libtorch_python is then not linked.
  RESFAST_CPU_ISAS          e.g. "AVX512": build only these instruction sets of
                            the CPU loops besides DEFAULT (quicker while iterating)

The CPU loops (csrc/cpu/kernels/) are compiled once per instruction set, as
ATen compiles its own CPU kernels: DEFAULT, plus AVX2 and AVX512 on x86-64;
csrc/cpu/dispatch.cpp picks the one ATen uses on the running CPU.
"""
import glob
import os
import platform
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def _max_jobs():
    # nvcc takes ~2 GB per job on these sources; cap jobs by memory as well as cores.
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    return str(max(1, min(os.cpu_count() or 1, int(mem_gb // 2))))


def _limited_api():
    return os.environ.get("RESFAST_PY_LIMITED_API", "0") == "1"


def cuda_archs():
    """TORCH_CUDA_ARCH_LIST if set; else the visible GPU's arch ("8.6"); else DEFAULT_ARCHS."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if archs:
        return archs
    try:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"{major}.{minor}"
    except RuntimeError:  # a driver too old for this torch, a GPU in a bad state: no GPU here
        pass
    return DEFAULT_ARCHS


# nvcc flags. No --use_fast_math: it flushes denormals to zero and makes division and
# square roots approximate in the BatchNorm statistics, finalize and backward kernels,
# whose results must match torch's within a small multiple of its own rounding error.
NVCC_FLAGS = ["-O3", "-std=c++20", "-DRESFAST_WITH_CUDA", "--expt-relaxed-constexpr", "-lineinfo"]


def _want_cuda():
    if os.environ.get("RESFAST_SKIP_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


# Instruction sets of the CPU loops: (name, compiler flags), ATen's own flags
# for its AVX2 and AVX512 kernels.
def _cpu_isas():
    isas = [("DEFAULT", [])]
    if platform.machine().lower() in ("x86_64", "amd64"):
        isas += [("AVX2", ["-mavx2", "-mfma", "-mf16c"]),
                 ("AVX512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                             "-mf16c"])]
    wanted = os.environ.get("RESFAST_CPU_ISAS")
    if wanted:
        isas = [(name, flags) for name, flags in isas
                if name == "DEFAULT" or name in wanted.split(",")]
    return isas


# OpenMP, which at::parallel_for compiles to (torch's own libgomp at run time).
OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []


def _extension():
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -ffp-contract=off: a*b+c rounds twice unless the code asks for an fma,
    # whatever the instruction set, as the CUDA kernels' mul_rn do.
    cxx_flags = ["-O3", "-std=c++20", "-ffp-contract=off", "-DRESFAST_PYTHON_MODULE", *OPENMP]
    cxx_flags += [f"-DRESFAST_CPU_{name}" for name, _ in _cpu_isas()]
    if not _want_cuda():
        return CppExtension("resfast._C", cpu_sources, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=OPENMP, py_limited_api=_limited_api())

    archs = cuda_archs()
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # what torch's build helpers compile for
    cxx_flags += ["-DRESFAST_WITH_CUDA", f'-DRESFAST_CUDA_ARCHS="{archs}"']
    include_dirs = []
    # ATen's CUDA headers pull in cuBLAS, which pip's wheels keep outside the toolkit.
    nvidia_include = os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13",
                                  "include")
    if os.path.isdir(nvidia_include):
        include_dirs.append(os.path.abspath(nvidia_include))
    return CUDAExtension(
        "resfast._C",
        cpu_sources + sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp")),
        include_dirs=include_dirs,
        extra_link_args=OPENMP,
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": NVCC_FLAGS,
        },
        py_limited_api=_limited_api(),
    )


class BuildWithCpuIsas(BuildExtension):
    """Compiles csrc/cpu/kernels/*.cpp once per instruction set (its own flags,
    CPU_CAPABILITY naming it) and links those objects into the extension."""

    def build_extension(self, ext):
        flags = ext.extra_compile_args
        cxx = list(flags["cxx"] if isinstance(flags, dict) else flags)
        sources = sorted(glob.glob("csrc/cpu/kernels/*.cpp"))
        objects = []
        # DEFAULT first: where instruction sets define the same inline function,
        # the linker keeps the first copy, which then runs on any CPU.
        for name, isa_flags in _cpu_isas():
            isa_cxx = cxx + isa_flags + ["-Wno-unknown-pragmas", f"-DCPU_CAPABILITY={name}",
                                         f"-DCPU_CAPABILITY_{name}"]
            objects += self.compiler.compile(
                sources, output_dir=os.path.join(self.build_temp, "cpu_" + name.lower()),
                include_dirs=ext.include_dirs, extra_postargs={"cxx": isa_cxx, "nvcc": []})
        ext.extra_objects = objects + list(ext.extra_objects or [])
        super().build_extension(ext)


# pip's build backend and `python setup.py` both run this file as __main__; the tests load
# it under another name to check cuda_archs() and NVCC_FLAGS without building.
if __name__ == "__main__":
    os.environ.setdefault("MAX_JOBS", _max_jobs())
    setup(
        ext_modules=[_extension()],
        cmdclass={"build_ext": BuildWithCpuIsas.with_options(use_ninja=True)},
        # torch defines Py_LIMITED_API as 3.10's; a wheel built so is tagged cp310-abi3
        options={"bdist_wheel": {"py_limited_api": "cp310"}} if _limited_api() else {},
    )
