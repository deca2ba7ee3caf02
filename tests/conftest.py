"""Shared fixtures. Every process a test starts is stopped by its PID (see helpers.Proc)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_report_header(config):
    import fastlb
    return f"fastlb under test: {fastlb.__version__} from {os.path.dirname(fastlb.__file__)}"


def pytest_configure(config):
    # CI's second run (.ci/run) tests the installed wheel: make sure that is what is imported.
    if os.environ.get("FASTLB_TEST_INSTALLED") == "1":
        import fastlb
        where = os.path.abspath(fastlb.__file__)
        if where.startswith(CHECKOUT + os.sep):
            raise pytest.UsageError(f"FASTLB_TEST_INSTALLED=1 but fastlb is imported from the "
                                    f"checkout ({where}); run pytest from outside it")


@pytest.fixture
def procs():
    """Processes started by a test; each is killed by PID when the test ends."""
    started = []
    yield started
    for p in started:
        p.stop()


@pytest.fixture
def ca():
    """A trustme CA for a test's certificates (the TLS tests; skipped where trustme is missing)."""
    return pytest.importorskip("trustme").CA()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs: a real filesystem to fill (root only; skipped where mounting is not
    allowed). Unmounted lazily at teardown, even if a process still has a file open there."""
    import subprocess
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)

