"""STYLE point 5, checked where it is true: the generated fastlb/_core.c. The per-event and
per-connection functions of the core make no Python C-API call. One reader of the C file for
the tests of every part of the core (limits, access, buffers, TLS, the connection log)."""
from __future__ import annotations

import functools
import os
import re

import pytest

from fastlb import _core

C_FILE = os.path.join(os.path.dirname(_core.__file__), "_core.c")
needs_c = pytest.mark.skipif(not os.path.exists(C_FILE), reason="needs the generated fastlb/_core.c")
# Reference counting is not a call into the interpreter; some parts allow it, some do not.
REFCOUNT = frozenset({"__Pyx_INCREF", "__Pyx_DECREF", "__Pyx_XDECREF", "__Pyx_XINCREF",
                      "__Pyx_RefNannySetupContext", "__Pyx_RefNannyFinishContext",
                      "__Pyx_RefNannyDeclarations"})


@functools.lru_cache(maxsize=1)
def _source() -> str:
    with open(C_FILE) as f:
        return f.read()


def python_calls(name: str, *, refcounts: bool = True) -> set[str]:
    """The Python C-API functions the C body of cdef function ``name`` calls (its mangled
    name's tail, e.g. "lim_admit" or "3Acl_admits_c"); comments, which echo the Cython
    source, are stripped. ``refcounts``: reference counting allowed."""
    src = _source()
    if "__Pyx_TraceLine(" in src:
        pytest.skip("a line-traced debug build calls the tracer on every line")
    m = re.search(r"^static [^;\n]*__pyx_f_6fastlb_5_core_[0-9]*" + re.escape(name)
                  + r"\([^)]*\) \{$", src, re.M)
    assert m, f"{name} not found in _core.c"
    i, depth = m.end(), 1
    while depth:
        depth += (src[i] == "{") - (src[i] == "}")
        i += 1
    code = re.sub(r"/\*.*?\*/", "", src[m.end():i], flags=re.S)
    calls = set(re.findall(r"\b((?:_?Py|__Pyx_)\w*)\s*\(", code))
    return calls - REFCOUNT if refcounts else calls


def no_python_call_test(names: list[str], *, refcounts: bool = True):
    """The test, one case a name, that each cdef function of ``names`` makes no Python C-API
    call (``refcounts``: as python_calls). A part's test module binds it to a test name:
    ``test_no_python_call = no_python_call_test(PER_EVENT)``."""
    @needs_c
    @pytest.mark.parametrize("name", names)
    def test(name: str) -> None:
        calls = python_calls(name, refcounts=refcounts)
        assert not calls, f"{name} calls the Python C-API: {sorted(calls)}"
    return test
