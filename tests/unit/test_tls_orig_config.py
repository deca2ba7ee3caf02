"""[orig] TLS origination in the plan: compute_plan gives each distinct profile once and, per
slot of a TLS backend, its profile and the name verified (sni, else the host as written); the
wire form survives msgpack (the worker channel); OrigContext takes the plan as built."""
import msgpack
import pytest

from fastlb import _core, config
from fastlb.dataplane import build_orig
from fastlb.plan import Plan
from fastlb.runtime import compute_plan

trustme = pytest.importorskip("trustme")


def test_plan_profiles_slots_names_and_wire(tmp_path):
    ca = trustme.CA()
    crt = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(crt))
    svc = config.loads(f'''
[[service]]
name = "web"
listen = ["127.0.0.1:8080"]
backend_tls = {{ ca = "{crt}" }}
backends = [ {{ address = "10.0.0.1:443" }},
             {{ address = "10.0.0.2:443", tls = {{ sni = "api.internal" }} }},
             {{ address = "10.0.0.3:5432", tls = {{ verify = false }} }},
             {{ address = "10.0.0.4:80", tls = false }} ]
''', resolve=False).services[0]
    slots = {"10.0.0.1:443": 4, "10.0.0.2:443": 5, "10.0.0.3:5432": 6, "10.0.0.4:80": 7, "": 0}
    p = compute_plan(svc, slots.__getitem__, lambda s: True, {}, 0.0)
    pem = ca.cert_pem.bytes()
    assert p.orig_profiles == ((pem, True, b"", b""), (pem, False, b"", b""))   # sni: same profile
    assert p.orig_slots == ((4, 0, "10.0.0.1"), (5, 0, "api.internal"), (6, 1, "10.0.0.3"))
    wire = msgpack.unpackb(msgpack.packb(p.to_wire(), use_bin_type=True), raw=False)
    assert Plan.from_wire(wire) == p
    o = build_orig(p)
    assert [o.uses_tls(s) for s in range(9)] == [False] * 4 + [True] * 3 + [False] * 2
    assert not o.cached(4)


def test_a_plan_without_tls_backends_builds_nothing():
    svc = config.loads('[[service]]\nname = "web"\nlisten = ["127.0.0.1:8080"]\n'
                       'backends = [ { address = "10.0.0.1:80" } ]\n', resolve=False).services[0]
    p = compute_plan(svc, {"10.0.0.1:80": 1, "": 0}.__getitem__, lambda s: True, {}, 0.0)
    assert p.orig_slots == () and build_orig(p) is None
    assert "orig" not in p.to_wire() or p.to_wire()["orig"] is None


def test_orig_context_refuses_bad_input():
    with pytest.raises(ValueError, match="ca: holds no PEM certificate"):
        _core.OrigContext([(b"junk", True, b"", b"")])
    with pytest.raises(ValueError, match="cert and key go together"):
        _core.OrigContext([(b"", True, b"x", b"")])
    with pytest.raises(ValueError, match="no profile 1"):
        _core.OrigContext([(b"", False, b"", b"")], [(0, 1, "a")])


def test_checks_use_the_backend_tls_unless_they_have_a_port_of_their_own():
    """HAProxy inherits `ssl` for checks only when the check has no `port` of its own."""
    import asyncio

    from fastlb.config import HealthConfig, OrigTls
    from fastlb.health import HealthChecker

    async def main():
        hc = HealthChecker(_core.HealthBitmap(bytearray(_core.HealthBitmap.size_for(4)), 4),
                           lambda *a: None)
        o = OrigTls(verify=False)
        hc.track("s", "a", 0, "127.0.0.1", 1, HealthConfig(), o, "127.0.0.1")
        hc.track("s", "b", 1, "127.0.0.1", 1, HealthConfig(port=2), o, "127.0.0.1")
        got = (hc.tls.get(("s", "a")), hc.tls.get(("s", "b")))
        hc.stop()
        return got
    assert asyncio.run(main()) == ((OrigTls(verify=False), "127.0.0.1"), None)
