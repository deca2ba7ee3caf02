"""[limits] STYLE point 5 for connection limits: what runs for every connection (the places
taken and given at accept, at the pick and at close) makes no Python C-API call, not even a
reference count. Checked in the generated fastlb/_core.c, as tests/unit/test_engine.py does
for the per-event functions. The pause, queue and report paths (at a limit, on an error) may
call Python; they are not listed."""
import pytest

from generated_c import needs_c, python_calls

PER_CONNECTION = ["lim_global", "lim_count", "lim_room", "lim_admit", "lim_unadmit",
                  "lim_admitted", "lim_note_max", "lim_take_backend", "lim_give_backend",
                  "lim_out_of_resources", "lim_release", "lim_closed"]


@needs_c
@pytest.mark.parametrize("name", PER_CONNECTION)
def test_no_python_call(name):
    calls = python_calls(name, refcounts=False)
    assert not calls, f"{name} calls the Python C-API: {sorted(calls)}"
