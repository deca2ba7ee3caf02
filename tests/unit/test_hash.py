"""xxh64: published vectors, an independent implementation, and the pure-Python reference."""
import subprocess
import sys

import pytest
import xxhash
from hypothesis import given, settings, strategies as st

from fastlb import _core, reference

# Vectors published with xxHash (xxhsum sanity checks and the spec's examples).
VECTORS = [
    (b"", 0, 0xEF46DB3751D8E999),
    (b"a", 0, 0xD24EC4F1A98C6E5B),
    (b"abc", 0, 0x44BC2CF5AD770999),
    (b"Nobody inspects the spammish repetition", 0, 0xFBCEA83C8A378BF1),
]


@pytest.mark.parametrize("data,seed,expected", VECTORS)
def test_published_vectors(data, seed, expected):
    assert _core.xxh64(data, seed) == expected
    assert reference.xxh64(data, seed) == expected


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 2**64 - 1))
def test_matches_python_xxhash_and_reference(data, seed):
    want = xxhash.xxh64_intdigest(data, seed)
    assert _core.xxh64(data, seed) == want
    assert _core.xxh64(bytearray(data), seed) == want
    assert reference.xxh64(data, seed) == want


def test_key_of_is_stable_across_processes():
    # A fresh interpreter has another hash() salt; the key must not change.
    code = "from fastlb import _core; print(_core.key_of('10.1.2.3'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == _core.key_of("10.1.2.3") == xxhash.xxh64_intdigest(b"10.1.2.3")


def test_str_is_refused_with_a_clear_error():
    with pytest.raises(TypeError, match="encode"):
        _core.xxh64("abc")
