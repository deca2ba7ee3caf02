"""STYLE point 5 for the access pieces: the functions the engine will call per connection
(PROXY parse/build, ACL lookup, source table) make no Python C-API call. Checked in the
generated fastlb/_core.c (comments, which echo the Cython source, stripped)."""
import os
import re

import pytest

C_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "fastlb", "_core.c")
PER_CONNECTION = [
    "pp_parse", "_pp_parse_v1", "_v1_byte_ok", "_pp_parse_v2", "_v1_port", "_v1_addr", "pp_tlv_find",
    "pp_build_v1", "pp_build_v2", "crc32c_update", "addr_from_sockaddr", "addr_is_v4",
    "_ival_find4", "_ival_find6", "3Acl_admits_c", "11SourceTable_acquire",
    "11SourceTable__pin", "11SourceTable_release", "src_hash", "11SourceTable_acquire_salted",
    # wired into the engine (core/admission.pxi): the per-event function of the before-connect
    # phase, and the Maglev key of a client known by its PROXY header
    "adm_on_client", "_hash_addr",
]


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
