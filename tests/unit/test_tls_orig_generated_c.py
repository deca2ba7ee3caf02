"""[orig] The per-event functions of TLS origination (core/tls_orig.pxi) make no Python C-API
call (STYLE point 5), checked in the generated fastlb/_core.c as test_tls_generated_c.py does
for termination. orig_begin (once per connected attempt) may touch Python (the engine's set of
connecting sessions), as tls_start does."""
import pytest

from generated_c import needs_c, python_calls

PER_EVENT = ["orig_on_handshake", "_orig_recv", "_orig_send", "orig_interest", "orig_shut_wr",
             "orig_drop"]


@needs_c
@pytest.mark.parametrize("name", PER_EVENT)
def test_no_python_call(name):
    calls = python_calls(name)
    assert not calls, f"{name} calls the Python C-API: {sorted(calls)}"
