"""Setup helpers of scripts/gpu_run.sh, on a machine that has only what it has.

    python scripts/gpu_setup.py wheels SITE WHEEL...   # unpack wheels of missing packages
    python scripts/gpu_setup.py env                    # versions, for env.txt

A wheel is a zip of its packages: unpacking it into SITE (on PYTHONPATH) installs
it without pip. A wheel whose packages the machine already imports is left alone,
so the machine's own versions win.
"""
import importlib
import importlib.util
import os
import platform
import sys
import zipfile

REPORTED = ("torch", "triton", "torchvision", "numpy", "pytest", "pytest_benchmark", "cudnn",
            "tqdm", "mlxtend", "matplotlib", "setuptools")


def unpack_missing(site, wheels):
    for whl in wheels:
        z = zipfile.ZipFile(whl)
        names = set(z.namelist())
        tops = {n.split("/")[0] for n in names}
        mods = sorted(t for t in tops if f"{t}/__init__.py" in names)
        mods += sorted(t[:-3] for t in tops if t.endswith(".py"))
        have = [m for m in mods if importlib.util.find_spec(m) is not None]
        if mods and len(have) == len(mods):
            print(f"{os.path.basename(whl)}: {', '.join(mods)} already importable, left alone")
            continue
        z.extractall(site)
        print(f"{os.path.basename(whl)}: unpacked into {site} ({', '.join(mods)})")


def environment():
    print("python", platform.python_version(), "at", os.path.realpath(sys.executable))
    for m in REPORTED:
        try:
            mod = importlib.import_module(m)
        except Exception as e:  # missing, or failing to load: either is worth a line
            print(f"{m:17} missing ({type(e).__name__}: {str(e)[:80]})")
            continue
        print(f"{m:17} {getattr(mod, '__version__', '?'):12} {os.path.dirname(mod.__file__ or '')}")
    import torch

    print("torch CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version(),
          "GPU", torch.cuda.is_available(), "CPUs", os.cpu_count())
    import resfast._C

    print("resfast._C from", resfast._C.__file__)


def main(argv):
    if argv[:1] == ["wheels"] and len(argv) >= 2:
        unpack_missing(argv[1], argv[2:])
    elif argv == ["env"]:
        environment()
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
