"""The metrics port's request-head parser and response writer (no I/O), and the snapshot join."""
import json

import pytest

from fastlb import config, httpapi, observe
from fastlb.health import HealthState
from fastlb.httpapi import HTTPError, parse_head, response


def test_parse_a_whole_head():
    req = parse_head(b"GET /api/stats?x=1 HTTP/1.1\r\nHost: a\r\nAccept:  */*  \r\nConnection: close")
    assert (req.method, req.path, req.version) == ("GET", "/api/stats", "HTTP/1.1")
    assert req.headers == {"host": "a", "accept": "*/*", "connection": "close"}
    assert not req.keep_alive


@pytest.mark.parametrize("head, keep", [
    (b"GET / HTTP/1.1", True), (b"GET / HTTP/1.1\r\nConnection: Close", False),
    (b"GET / HTTP/1.0", False), (b"GET / HTTP/1.0\r\nConnection: keep-alive", True)])
def test_keep_alive_follows_the_version_and_the_header(head, keep):
    assert parse_head(head).keep_alive is keep


@pytest.mark.parametrize("head, status", [
    (b"GET /", 400), (b"GET  / HTTP/1.1", 400), (b"GET metrics HTTP/1.1", 400),
    (b"GET / HTTP/2.0", 505), (b"GET / HTTP/1.1\r\nno colon", 400),
    (b"GET / HTTP/1.1\r\n Folded: x", 400), (b"POST / HTTP/1.1\r\nContent-Length: 3", 413),
    (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked", 413),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * httpapi.MAX_HEAD, 431)])
def test_bad_heads_are_refused_with_a_status(head, status):
    with pytest.raises(HTTPError) as exc:
        parse_head(head)
    assert exc.value.status == status and exc.value.message


def test_every_prefix_of_a_head_parses_or_raises_the_protocol_error():
    """h11's fuzz invariant, on every truncation and a few corruptions: never another error."""
    head = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:9100\r\nUser-Agent: curl/8"
    cases = [head[:i] for i in range(len(head) + 1)]
    cases += [head[:i] + bytes([c]) + head[i + 1:] for i in range(0, len(head), 3) for c in (0, 0x3A, 0xFF)]
    for case in cases:
        try:
            parse_head(case)
        except HTTPError:
            pass


def test_head_response_has_the_bodys_length_and_no_body():
    body = b"x" * 1234
    get, head = response(200, body, "text/plain"), response(200, body, "text/plain", head_only=True)
    assert b"Content-Length: 1234\r\n" in head and head.endswith(b"\r\n\r\n")
    assert get == head + body


def _sources(stats, services=None, health=None):
    return observe.Sources(stats=lambda: stats, services=lambda: services or {},
                           health=health or (lambda s, a: None), started=1000.0, pid=42)


def test_snapshot_maps_states_as_haproxy_does_and_joins_health():
    def b(address, state, health):
        return {"address": address, "weight": 2, "state": state, "health": health, "active": 1,
                "total": 5, "bytes_in": 10, "bytes_out": 20, "connect_failures": 0,
                "check_failures": 3, "health_reason": "r"}
    stats = [{"service": "web", "backends": [b("a:1", "ready", "up"), b("b:1", "ready", "down"),
                                              b("c:1", "maint", "up"), b("d:1", "drain", "up"),
                                              b("e:1", "drain", "down")]}]
    svc = config.loads('[[service]]\nname = "web"\nlisten = "127.0.0.1:1"\n'
                           'backends = [{ address = "127.0.0.1:2" }]\n').services[0]
    hs = HealthState(config.HealthConfig(fall=1))
    hs.on_check(False, "refused")
    snap = _sources(stats, {"web": svc}, lambda s, a: hs if a == "b:1" else None)
    snap = observe.snapshot(snap)
    json.dumps(snap)                                   # plain data
    (web,) = snap["services"]
    assert [x["status"] for x in web["backends"]] == ["UP", "DOWN", "MAINT", "DRAIN", "DOWN"]
    assert web["status"] == "UP" and web["active_servers"] == 1 and web["weight"] == 2
    assert web["listen"] == ["127.0.0.1:1"] and web["policy"] == "round_robin"
    down = web["backends"][1]
    assert down["checked"] and down["downs"] == 1 and down["last_change"] >= hs.changed_at > 0
    assert not web["backends"][0]["checked"] and web["backends"][0]["last_change"] is None
    assert (snap["pid"], snap["started"]) == (42, 1000.0)
