"""Shared fixtures. Every process a test starts is stopped by its PID (see helpers.Proc)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest


@pytest.fixture
def procs():
    """Processes started by a test; each is killed by PID when the test ends."""
    started = []
    yield started
    for p in started:
        p.stop()
