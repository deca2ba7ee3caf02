"""[limits] STYLE point 5 for connection limits: what runs for every connection (the places
taken and given at accept, at the pick and at close) makes no Python C-API call, not even a
reference count. Checked in the generated fastlb/_core.c, as tests/unit/test_engine.py does
for the per-event functions. The pause, queue and report paths (at a limit, on an error) may
call Python; they are not listed."""

from generated_c import no_python_call_test

PER_CONNECTION = ["lim_global", "lim_count", "lim_room", "lim_admit", "lim_unadmit",
                  "lim_admitted", "lim_note_max", "lim_take_backend", "lim_give_backend",
                  "lim_out_of_resources", "lim_release", "lim_closed"]


test_no_python_call = no_python_call_test(PER_CONNECTION, refcounts=False)
