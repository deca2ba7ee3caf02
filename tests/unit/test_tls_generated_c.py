"""[tls] The TLS per-event functions (core/tls.pxi) make no Python C-API call (STYLE point 5,
docs/ARCHITECTURE.md), checked in the generated fastlb/_core.c like the session's
(test_engine.py checks Session.on_client/_pump/_flush/_update/_shut_if_done, whose TLS hooks
call these). The once-per-connection transitions (tls_start, _tls_established, tls_expired,
tls_close) may touch Python (the engine's sets), as the access phase's do."""

from generated_c import no_python_call_test

PER_EVENT = ["tls_on_handshake", "_tls_recv", "_tls_send", "tls_interest", "tls_fill_cap",
             "tls_shut_wr",
             "tls_pp_tlvs"]      # per connection: the PROXY v2 TLVs (stage 3)


test_no_python_call = no_python_call_test(PER_EVENT)
