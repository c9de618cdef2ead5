"""Package-wide properties: what importing resfast loads."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_matplotlib_is_imported_only_where_it_draws():
    """Charts are a feature (training curves, benchmark plots), so matplotlib is a
    dependency, imported inside the functions that draw: importing every
    resfast module, the CLI included, leaves it unloaded. (tqdm cannot be checked
    this way: torch itself imports it.)"""
    code = ("import sys, resfast, resfast.models, resfast.fusion, resfast.twin, resfast.train, "
            "resfast.data, resfast.reproduce, resfast.bench, resfast.bench.cli, "
            "resfast.bench.report, resfast.train.metrics, resfast.__main__; print('matplotlib' in "
            "sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "False"
