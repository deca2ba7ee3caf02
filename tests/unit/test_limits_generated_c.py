"""[limits] STYLE point 5 for connection limits: what runs for every connection (the places
taken and given at accept, at the pick and at close) makes no Python C-API call, not even a
reference count. Checked in the generated fastlb/_core.c, as tests/unit/test_engine.py does
for the per-event functions. The pause, queue and report paths (at a limit, on an error) may
call Python; they are not listed."""
import os
import re

import pytest

C_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "fastlb", "_core.c")
PER_CONNECTION = ["lim_global", "lim_count", "lim_room", "lim_admit", "lim_unadmit",
                  "lim_admitted", "lim_note_max", "lim_take_backend", "lim_give_backend",
                  "lim_out_of_resources", "lim_release", "lim_closed"]


def _body(src, name):
    m = re.search(r"^static [^;\n]*__pyx_f_6fastlb_5_core_[0-9]*" + re.escape(name)
                  + r"\([^)]*\) \{$", src, re.M)
    assert m, f"{name} not found in _core.c"
    depth, i = 0, m.end() - 1
    start = i
    while True:
        depth += {"{": 1, "}": -1}.get(src[i], 0)
        if depth == 0:
            break
        i += 1
    return re.sub(r"/\*.*?\*/", "", src[start:i + 1], flags=re.S)


@pytest.mark.skipif(not os.path.exists(C_FILE), reason="needs the generated fastlb/_core.c")
@pytest.mark.parametrize("name", PER_CONNECTION)
def test_no_python_call(name):
    with open(C_FILE) as f:
        src = f.read()
    calls = set(re.findall(r"\b(Py[A-Z]\w*|__Pyx_\w+|_Py\w+)\s*\(", _body(src, name)))
    assert not calls, f"{name} calls {sorted(calls)}"
