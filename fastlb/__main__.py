"""``python -m fastlb``.

Run from the root of a checkout, ``-m`` imports the checkout's ``fastlb/`` (the current directory
comes first on sys.path), which has no built extension when fastlb was installed with
``pip install .``. In that case, and only then, this re-executes itself once with ``-P`` (no
current directory on sys.path, Python 3.11+), so the installed package runs: what a user who
installed fastlb expects, wherever they stand. A source tree with an extension built in place
(``make compile``) is used as it is.
"""
import os
import sys


def _installed_elsewhere() -> bool:
    """Whether a fastlb is importable without the current directory (what -P will see):
    site-packages, or an editable install's import hook."""
    saved = sys.path[:]
    sys.path[:] = [p for p in saved[1:] if p]
    try:
        return any(getattr(f, "find_spec", None) and f.find_spec("fastlb", None)
                   for f in sys.meta_path)
    finally:
        sys.path[:] = saved


def _ensure_runnable() -> None:
    try:
        from fastlb import _core  # noqa: F401
    except ImportError as exc:
        here = os.path.dirname(os.path.abspath(__file__))
        if sys.flags.safe_path or not _installed_elsewhere():   # nothing else to run
            sys.exit(f"fastlb: the extension fastlb._core cannot be imported from {here} ({exc});"
                     f" install fastlb (python3 -m pip install .) or build it in place"
                     f" (make compile)")
        os.execv(sys.executable, [sys.executable, "-P", "-m", "fastlb", *sys.argv[1:]])


_ensure_runnable()

from fastlb.cli import main  # noqa: E402

sys.exit(main())
