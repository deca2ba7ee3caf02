"""[mem] The buffer functions the per-event code calls (core/buffers.pxi) and the keepalive
setter of the accept/connect path (core/timers.pxi) make no Python C-API call (STYLE point 5,
docs/ARCHITECTURE.md), checked in the generated fastlb/_core.c like the session's."""

from generated_c import no_python_call_test

PER_EVENT = ["_buf_take", "_buf_give", "_buf_get", "_buf_put", "_buf_wait", "_buf_unwait",
             "_buf_allowed", "_buf_held", "_map_buffer", "_unmap_buffer", "_keepalive"]


test_no_python_call = no_python_call_test(PER_EVENT)
