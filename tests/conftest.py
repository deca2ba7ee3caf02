"""Shared fixtures. Every process a test starts is stopped by its PID (see helpers.Proc)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
