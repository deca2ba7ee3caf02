"""STYLE point 5 for the access pieces: the functions the engine will call per connection
(PROXY parse/build, ACL lookup, source table) make no Python C-API call. Checked in the
generated fastlb/_core.c (comments, which echo the Cython source, stripped)."""

from generated_c import no_python_call_test

PER_CONNECTION = [
    "pp_parse", "_pp_parse_v1", "_v1_byte_ok", "_pp_parse_v2", "_v1_port", "_v1_addr", "pp_tlv_find",
    "pp_build_v1", "pp_build_v2", "crc32c_update", "addr_from_sockaddr", "addr_is_v4",
    "_ival_find4", "_ival_find6", "3Acl_admits_c", "11SourceTable_acquire",
    "11SourceTable__pin", "11SourceTable_release", "src_hash", "11SourceTable_acquire_salted",
    # wired into the engine (core/admission.pxi): the per-event function of the before-connect
    # phase, and the Maglev key of a client known by its PROXY header
    "adm_on_client", "_hash_addr",
]


test_no_python_call = no_python_call_test(PER_CONNECTION, refcounts=False)
