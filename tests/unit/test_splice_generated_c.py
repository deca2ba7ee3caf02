"""[splice] The per-event functions of core/splice.pxi (and the session's _pump/_flush that
call them) make no Python C-API call (STYLE point 5, docs/ARCHITECTURE.md), checked in the
generated fastlb/_core.c like the session's."""

from generated_c import no_python_call_test

PER_EVENT = ["spl_wanted", "spl_pump", "spl_flush", "spl_after_recv", "spl_take", "spl_give",
             "spl_close", "spl_trim", "7Session__pump", "7Session__flush"]


test_no_python_call = no_python_call_test(PER_EVENT)
