"""The wheel users install: complete (every module of the package, the built extension, its
stub and py.typed) and lean (no generated C, no Cython sources, no annotation HTML), and
importable on its own. Built here from the checkout, as `pip install .` builds it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "setup.py")),
                                reason="needs the source checkout")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("dist")
    # From a clean copy of the tree, as a fresh clone is: setuptools reuses a build/ directory,
    # and a stale one (a module since deleted) would end up in the wheel.
    src = tmp_path_factory.mktemp("src") / "fastlb-src"
    generated = shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "*.so", "_core.c", "__pycache__", ".hypothesis",
        ".benchmarks", "results")

    def ignore(directory: str, names: list[str]) -> set[str]:
        # annotation HTML (cython -a) is generated; the status page is a source file
        return set(generated(directory, names)) | {
            n for n in names if n.endswith(".html") and n != "status.html"}

    shutil.copytree(ROOT, src, ignore=ignore)
    # --no-build-isolation: the test extra brings setuptools and Cython, so no download here.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(src)], check=True, timeout=300, capture_output=True)
    [name] = [f for f in os.listdir(out) if f.endswith(".whl")]
    return zipfile.ZipFile(out / name)


# Package data users need at run time: the status page the metrics port serves, the sample
# config (fastlb demo --print-config).
DATA = {"fastlb/_core.pyi", "fastlb/py.typed", "fastlb/status.html", "fastlb/sample.toml"}


def _package_modules() -> set[str]:
    """Every Python module of the source package, as wheel paths (fastlb/admin/server.py...)."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, "fastlb")):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for f in filenames:
            if f.endswith(".py"):
                found.add(os.path.relpath(os.path.join(dirpath, f), ROOT))
    return found


def test_wheel_has_every_module_and_the_extension(wheel):
    names = set(wheel.namelist())
    missing = _package_modules() - names
    assert not missing, f"modules missing from the wheel: {sorted(missing)}"
    assert "fastlb/admin/__init__.py" in names          # the subpackage a hand list forgot
    assert any(n.startswith("fastlb/_core.") and n.endswith(".so") for n in names)
    assert DATA <= names


def test_wheel_has_nothing_generated_or_source_only(wheel):
    package_files = [n for n in wheel.namelist() if not n.startswith("fastlb-")]
    allowed = _package_modules() | DATA
    extra = [n for n in package_files if n not in allowed
             and not (n.startswith("fastlb/_core.") and n.endswith(".so"))]
    assert not extra, f"files that do not belong in the wheel: {extra}"
    for suffix in (".c", ".pyx", ".pxi", ".pxd", ".h", ".html"):
        assert not [n for n in package_files if n.endswith(suffix) and n not in DATA], suffix


def test_every_module_imports_from_the_wheel_alone(wheel, tmp_path):
    """Unpacked and put first on the path with -P (no current directory), every module of the
    package imports, and from there: nothing the package needs lives only in the checkout."""
    wheel.extractall(tmp_path)
    code = ("import importlib, pkgutil, fastlb\n"
            "assert fastlb.__file__.startswith(%r), fastlb.__file__\n"
            "names = [m.name for m in pkgutil.walk_packages(fastlb.__path__, 'fastlb.')]\n"
            "skip = {'fastlb.__main__'}\n"
            "for n in names:\n"
            "    if n not in skip:\n"
            "        importlib.import_module(n)\n"
            "print(len(names))\n") % str(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-P", "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= len(_package_modules()) - 1


def test_the_wheel_prints_the_sample_config_and_serves_the_status_page(wheel, tmp_path):
    """The package data is read through importlib.resources from the installed package."""
    wheel.extractall(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-P", "-m", "fastlb", "demo", "--print-config"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    with open(os.path.join(ROOT, "fastlb", "sample.toml")) as f:
        assert out.stdout == f.read()
    code = "from fastlb import httpapi; print(len(httpapi.status_page()))"
    out = subprocess.run([sys.executable, "-P", "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and int(out.stdout) > 1000, out.stderr
