"""Running fastlb as a user does: from a checkout's root whose source tree has no built
extension (`pip install .` built it into site-packages), and through the console script from
any other directory."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import fastlb

PACKAGE = os.path.dirname(os.path.abspath(fastlb.__file__))


def _source_tree_without_extension(dest: str) -> None:
    """A copy of the package's Python files only: what a fresh clone's fastlb/ is."""
    shutil.copytree(PACKAGE, os.path.join(dest, "fastlb"),
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__", "*.html"))


def test_python_m_fastlb_demo_from_a_checkout_root_runs_the_installed_package(tmp_path):
    """`python3 -m fastlb demo` from a clone's root once failed with `cannot import name
    '_core'`: -m imported the checkout. It must run the installed package, children included."""
    _source_tree_without_extension(str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "fastlb", "demo", "--connections", "40"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 client errors after the kill" in out.stdout
    assert "ImportError" not in out.stderr


def test_a_source_tree_without_extension_and_nothing_installed_says_what_to_do(tmp_path):
    _source_tree_without_extension(str(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -S: no site-packages, so no installed fastlb to fall back on.
    out = subprocess.run([sys.executable, "-S", "-m", "fastlb", "--version"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "fastlb._core cannot be imported" in out.stderr
    assert "pip install" in out.stderr and "make compile" in out.stderr


def test_console_script_runs_from_another_directory(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "fastlb")
    assert os.path.exists(script), "the fastlb console script is installed beside python"
    for args in (["--version"], ["--help"], ["ctl", "--help"]):
        out = subprocess.run([script, *args], cwd=tmp_path, capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.rstrip().splitlines()[-2].startswith("exit codes")
