import os
import sys

import pytest

SUPPORT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support")
if SUPPORT not in sys.path:  # tests/support/tiny_models.py is addressed as --model tiny_models:<fn>
    sys.path.insert(0, SUPPORT)


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
