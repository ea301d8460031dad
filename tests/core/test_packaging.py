"""quantize/, export/ and bench/ install as kvant.quantize, .export, .bench (never top level)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from tests.conftest import REPO
from tests.core.test_architecture import arch


def test_wheel_maps_the_root_folders_under_kvant(tmp_path):
    # built from a clean copy: a stale build/ in the checkout would fill in missing modules
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        "build", ".venv", "out", ".git", ".gpu", "*.egg-info", "__pycache__", ".*_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(source)], check=True)
    wheel = next(tmp_path.glob("kvant-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("quantize", "export", "bench"):
        assert f"kvant/{package}/__init__.py" in names
        assert not any(n.startswith(f"{package}/") for n in names)
    assert not any(n.startswith("tests/") for n in names)
    # every module of the tree is in the wheel (a subpackage missing from pyproject's list
    # works in the editable install and breaks every real one)
    expected = {name.replace(".", "/") + ("/__init__.py" if path.name == "__init__.py"
                                          else ".py")
                for name, path in arch.modules().items()}
    assert expected - set(names) == set()
    # a regular install of that wheel imports on its own (-S: no site, so no editable finder)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import kvant.quantize, kvant.export, "
             "kvant.bench, kvant.app.cli; print(kvant.quantize.__file__)")
    out = subprocess.run([sys.executable, "-S", "-c", probe, str(target)], check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == str(target / "kvant" / "quantize" / "__init__.py")


def test_editable_install_points_at_the_checkout():
    import kvant.quantize

    assert kvant.quantize.__file__ == str(REPO / "quantize" / "__init__.py")
