"""How fastlb starts Python processes of its own: the balancer started by ``fastlb demo``, the
worker processes started by the supervisor, the development backends of the demo and tests.

Owner: the command line and environment of those children. The rule: a child runs the same
fastlb package as its parent, never a source tree that happens to be its current directory.

Why this is needed: ``python -m MODULE`` puts the current directory first on ``sys.path``. Run
from a checkout, a child would import the checkout's ``fastlb/`` (which has no built extension
when fastlb was installed with ``pip install .``) instead of the installed package. So children
are started with ``-P`` (Python 3.11: no current directory on ``sys.path``), and when the
parent's own package is not otherwise importable (a source tree built in place, or an editable
install whose path is added by an import hook), its root is passed on in ``PYTHONPATH``.
"""
from __future__ import annotations

import os
import sys

import fastlb

# The directory that holds the running fastlb package (site-packages, or a source checkout).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastlb.__file__)))


def command(module: str, *args: str) -> list[str]:
    """The argv that runs ``python -m module args...`` on this interpreter, without the current
    directory on its path."""
    return [sys.executable, "-P", "-m", module, *args]


def environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child started with command(): ``base`` (default: ours), with the
    package root prepended to PYTHONPATH when a child would not find this package otherwise."""
    env = dict(os.environ if base is None else base)
    # sys.path[0] is the script's directory or the current directory (absent under -P).
    visible = sys.path if sys.flags.safe_path else sys.path[1:]
    if PACKAGE_ROOT not in {os.path.abspath(p or os.curdir) for p in visible}:
        old = env.get("PYTHONPATH")
        env["PYTHONPATH"] = PACKAGE_ROOT + (os.pathsep + old if old else "")
    return env
