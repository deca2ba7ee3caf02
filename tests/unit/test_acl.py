"""CIDR access lists (core/acl.pxi) against the ipaddress linear-scan twin (RefAcl)."""
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlb import _core
from fastlb.errors import CoreArgumentError, CoreTypeError
from fastlb.reference_access import RefAcl


def check(allow, deny, ips):
    acl, twin = _core.Acl(allow=allow, deny=deny), RefAcl(allow, deny)
    return {ip: acl.admits(ip) for ip in ips if acl.admits(ip) == twin.admits(ip) or
            pytest.fail(f"{ip}: core {acl.admits(ip)}, twin {twin.admits(ip)} for {acl!r}")}


def test_empty_lists_admit_everyone():
    assert all(check([], [], ["0.0.0.0", "255.255.255.255", "::", "2001:db8::1",
                              "::ffff:10.0.0.1"]).values())


def test_deny_wins_and_an_empty_allow_admits_the_rest():
    v = check([], ["10.0.0.0/8", "2001:db8::/32"],
              ["10.1.2.3", "11.0.0.1", "9.255.255.255", "2001:db8::5", "2001:db9::1"])
    assert v == {"10.1.2.3": False, "11.0.0.1": True, "9.255.255.255": True,
                 "2001:db8::5": False, "2001:db9::1": True}


def test_deny_inside_allow_and_allow_inside_deny():
    v = check(["10.0.0.0/8", "192.168.1.7/32"], ["10.1.0.0/16", "192.168.0.0/16"],
              ["10.0.0.1", "10.1.255.255", "10.2.0.0", "192.168.1.7", "172.16.0.1"])
    assert v == {"10.0.0.1": True, "10.1.255.255": False, "10.2.0.0": True,
                 "192.168.1.7": False, "172.16.0.1": False}


def test_slash_zero_and_host_routes():
    assert check(["0.0.0.0/0"], ["1.2.3.4/32"], ["1.2.3.4", "1.2.3.5", "::1"]) == {
        "1.2.3.4": False, "1.2.3.5": True, "::1": False}   # v4 allow: v6 clients not admitted
    assert check(["::/0"], ["2001:db8::1/128"], ["2001:db8::1", "2001:db8::2", "1.2.3.4",
                                                 "::ffff:1.2.3.4"]) == {
        "2001:db8::1": False, "2001:db8::2": True, "1.2.3.4": False, "::ffff:1.2.3.4": False}
    assert check([], ["0.0.0.0/0", "::/0"], ["1.1.1.1", "::2"]) == {"1.1.1.1": False, "::2": False}
    a = _core.Acl(allow=["255.255.255.255/32", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"])
    assert a.admits("255.255.255.255") and not a.admits("255.255.255.254")
    assert a.admits("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")
    assert not a.admits("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe")


def test_ipv4_mapped_clients_match_ipv4_rules():
    assert check(["10.0.0.0/8"], ["10.9.0.0/16"], ["::ffff:10.0.0.1", "::ffff:10.9.0.1",
                                                   "::ffff:11.0.0.1"]) == {
        "::ffff:10.0.0.1": True, "::ffff:10.9.0.1": False, "::ffff:11.0.0.1": False}


def test_intervals_are_merged_and_disjoint():
    a = _core.Acl(allow=["10.0.0.0/25", "10.0.0.128/25", "10.0.0.0/24", "10.0.1.0/24"],
                  deny=["10.0.0.64/26"])
    assert a.intervals()[4] == [(0x0A000000, 0x0A00003F), (0x0A000080, 0x0A0001FF)]
    assert a.intervals()[6] == []
    assert a.allow == ("10.0.0.0/25", "10.0.0.128/25", "10.0.0.0/24", "10.0.1.0/24")


@pytest.mark.parametrize("kwargs,err,msg", [
    ({"allow": ["10.0.0.1/8"]}, CoreArgumentError,
     r"acl.allow\[0\] = '10.0.0.1/8': .*did you mean 10.0.0.0/8\?"),
    ({"deny": ["1.2.3.0/24", "nope"]}, CoreArgumentError, r"acl.deny\[1\] = 'nope'"),
    ({"deny": ["10.0.0.0/33"]}, CoreArgumentError, r"acl.deny\[0\] = '10.0.0.0/33'"),
    ({"allow": ["::ffff:10.0.0.0/104"]}, CoreArgumentError, r"write it as IPv4 \(10.0.0.0/8\)"),
    ({"allow": [42]}, CoreTypeError, r"acl.allow\[0\] must be a CIDR string, got int"),
    ({"allow": "10.0.0.0/8"}, CoreTypeError, r"acl.allow must be a list of CIDR strings"),
])
def test_bad_entries_are_named(kwargs, err, msg):
    with pytest.raises(err, match=msg):
        _core.Acl(**kwargs)


def test_bad_client_address():
    with pytest.raises(CoreArgumentError, match="'10.0.0' is not an IPv4 or IPv6 address"):
        _core.Acl().admits("10.0.0")


def _cidr(version):
    bits = 32 if version == 4 else 128
    cls = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
    return st.builds(lambda a, p: str(cls((a >> (bits - p) << (bits - p), p))),
                     st.integers(0, 2**bits - 1), st.integers(0, bits))


# Clustered addresses so that random CIDRs and clients overlap often.
def _near(version):
    bits = 32 if version == 4 else 128
    base = 0x0A000000 if version == 4 else 0x20010DB8 << 96
    cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    shifts = [0, 4, 8, 16, 24] + ([] if version == 4 else [64, 100])
    return st.builds(lambda off, shift: str(cls((base + (off << shift)) % 2**bits)),
                     st.integers(0, 255), st.sampled_from(shifts))


def _near_cidr(version):
    bits = 32 if version == 4 else 128
    return st.builds(lambda a, p: str(ipaddress.ip_network(f"{a}/{p}", strict=False)),
                     _near(version), st.integers(max(0, bits - 40), bits))


cidrs = st.lists(st.one_of(_cidr(4), _cidr(6), _near_cidr(4), _near_cidr(6)), max_size=12)
clients = st.lists(st.one_of(_near(4), _near(6), _near(4).map(lambda a: "::ffff:" + a),
                             st.ip_addresses().map(str)), min_size=1, max_size=20)


@settings(max_examples=400, deadline=None)
@given(cidrs, cidrs, clients)
def test_same_verdicts_as_the_twin(allow, deny, ips):
    acl, twin = _core.Acl(allow=allow, deny=deny), RefAcl(allow, deny)
    for ip in ips:
        assert acl.admits(ip) == twin.admits(ip), (ip, allow, deny)
    # the admitted set of each family is sorted, disjoint and not adjacent (fully merged)
    for ivs in acl.intervals().values():
        for (a, b), (c, d) in zip(ivs, ivs[1:], strict=False):
            assert a <= b and b + 1 < c <= d


def test_many_cidrs_build_and_answer():
    allow = [f"10.{i // 256}.{i % 256}.0/24" for i in range(5000)]
    deny = [f"10.{i // 256}.{i % 256}.128/25" for i in range(0, 5000, 2)]
    acl = _core.Acl(allow=allow, deny=deny)
    assert acl.n4 <= 5000
    twin = RefAcl(allow[:300], [d for d in deny if d.startswith("10.0.") or d.startswith("10.1.")])
    for ip in ["10.0.0.1", "10.0.0.200", "10.0.1.200", "10.1.2.3", "10.30.0.1", "10.19.135.1"]:
        if ip.startswith(("10.0.", "10.1.")):
            assert acl.admits(ip) == twin.admits(ip), ip
    assert acl.admits("10.19.135.1") and not acl.admits("10.19.136.1")
