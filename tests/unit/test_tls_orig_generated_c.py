"""[orig] The per-event functions of TLS origination (core/tls_orig.pxi) make no Python C-API
call (STYLE point 5), checked in the generated fastlb/_core.c as test_tls_generated_c.py does
for termination. orig_begin (once per connected attempt) may touch Python (the engine's set of
connecting sessions), as tls_start does."""

from generated_c import no_python_call_test

PER_EVENT = ["orig_on_handshake", "_orig_recv", "_orig_send", "orig_interest", "orig_shut_wr",
             "orig_drop"]


test_no_python_call = no_python_call_test(PER_EVENT)
