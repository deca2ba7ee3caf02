"""[tls] The TLS per-event functions (core/tls.pxi) make no Python C-API call (STYLE point 5,
docs/ARCHITECTURE.md), checked in the generated fastlb/_core.c like the session's
(test_engine.py checks Session.on_client/_pump/_flush/_update/_shut_if_done, whose TLS hooks
call these). The once-per-connection transitions (tls_start, _tls_established, tls_expired,
tls_close) may touch Python (the engine's sets), as the access phase's do."""
import os
import re

import pytest

C_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "fastlb", "_core.c")
PER_EVENT = ["tls_on_handshake", "_tls_recv", "_tls_send", "tls_interest", "tls_fill_cap",
             "tls_shut_wr",
             "tls_pp_tlvs"]      # per connection: the PROXY v2 TLVs (stage 3)
NOT_CALLS = {"__Pyx_INCREF", "__Pyx_DECREF", "__Pyx_XDECREF", "__Pyx_XINCREF",
             "__Pyx_RefNannySetupContext", "__Pyx_RefNannyFinishContext",
             "__Pyx_RefNannyDeclarations"}


@pytest.mark.skipif(not os.path.exists(C_FILE), reason="needs the generated fastlb/_core.c")
@pytest.mark.parametrize("name", PER_EVENT)
def test_no_python_call(name):
    with open(C_FILE) as f:
        src = f.read()
    if "__Pyx_TraceLine(" in src:
        pytest.skip("a line-traced debug build calls the tracer on every line")
    m = re.search(r"^static [^;\n]*__pyx_f_6fastlb_5_core_" + re.escape(name) + r"\([^)]*\) \{$",
                  src, re.M)
    assert m, f"{name} not found in _core.c"
    i, depth = m.end(), 1
    while depth:
        depth += (src[i] == "{") - (src[i] == "}")
        i += 1
    code = re.sub(r"/\*.*?\*/", "", src[m.end():i], flags=re.S)
    calls = set(re.findall(r"\b((?:_?Py|__Pyx_)\w*)\s*\(", code)) - NOT_CALLS
    assert not calls, f"{name} calls the Python C-API: {sorted(calls)}"
