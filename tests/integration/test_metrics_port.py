"""The metrics port of a running fastlb: HAProxy-named Prometheus metrics (checked with
prometheus_client's parser), the JSON API, /healthz, HEAD, errors and the port's own limits."""
import json
import signal
import socket
import time

from prometheus_client.parser import text_string_to_metric_families

from fastlb import httpapi
from fastlb.admin.client import AdminClient
from helpers import free_port, service, start_backend, start_fastlb


def http(port, raw, timeout=10.0):
    """Send raw bytes, read until the server closes: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def get(port, path, method="GET"):
    return http(port, f"{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())


def start(procs, tmp_path, backends, **opts):
    mport = free_port()
    cfg = (f'[global]\nmetrics = "127.0.0.1:{mport}"\nadmin = "unix:{tmp_path}/admin.sock"\n'
           + service("web", backends, **opts))
    lb, ports = start_fastlb(procs, cfg)
    return lb, ports, mport


def scrape(mport):
    status, headers, body = get(mport, "/metrics")
    assert status == 200 and headers["Content-Type"] == httpapi.promex.CONTENT_TYPE
    samples, families = {}, set()
    for fam in text_string_to_metric_families(body.decode()):
        families.add(fam.name)
        for s in fam.samples:
            samples[(s.name, s.labels.get("proxy"), s.labels.get("server"), s.labels.get("state"))] = s.value
    return families, samples


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_server_status_and_transitions_with_haproxy_names(procs, tmp_path):
    backs = {n: start_backend(procs, "announce", name=n) for n in "abcd"}
    health = "{ interval = \"200ms\", timeout = \"200ms\", rise = 1, fall = 1 }"
    lb, (port,), mport = start(procs, tmp_path,
                               [(backs[n][1], w) for n, w in zip("abcd", (1, 2, 3, 4), strict=False)],
                               health=health)
    addr = {n: f"127.0.0.1:{backs[n][1]}" for n in "abcd"}
    with AdminClient(socket_path=f"{tmp_path}/admin.sock", timeout=10) as c:
        c.call("set_state", service="web", address=addr["c"], state="maint")
        c.call("set_state", service="web", address=addr["d"], state="drain")
    backs["b"][0].stop()
    lb.wait_line(r"127.0.0.1:\d+ DOWN: 1 check failed")
    families, m = scrape(mport)
    for n, state in zip("abcd", ("UP", "DOWN", "MAINT", "DRAIN"), strict=False):
        for s in ("UP", "DOWN", "MAINT", "DRAIN"):
            assert m[("fastlb_server_status", "web", addr[n], s)] == (s == state), (n, s)
    assert m[("fastlb_server_check_up_down_total", "web", addr["b"], None)] == 1
    assert m[("fastlb_server_check_up_down_total", "web", addr["a"], None)] == 0
    assert m[("fastlb_server_check_failures_total", "web", addr["b"], None)] >= 1
    assert 0 <= m[("fastlb_server_check_last_change_seconds", "web", addr["b"], None)] < 10
    assert m[("fastlb_server_downtime_seconds_total", "web", addr["b"], None)] > 0
    assert m[("fastlb_server_weight", "web", addr["c"], None)] == 3
    assert m[("fastlb_backend_status", "web", None, "UP")] == 1
    assert m[("fastlb_backend_active_servers", "web", None, None)] == 1        # only a takes new ones
    assert m[("fastlb_backend_weight", "web", None, None)] == 1
    assert m[("fastlb_process_start_time_seconds", None, None, None)] <= time.time()
    assert m[("process_open_fds", None, None, None)] > 0                      # the standard ones
    assert all(f.startswith(("fastlb_server_", "fastlb_backend_", "fastlb_process_", "process_",
                             "fastlb_frontend_", "fastlb_buffer",    # [limits]; [mem] fastlb_buffers_*
                             "fastlb_tls_", "fastlb_admin_",         # [tls] handshakes; [admin] refusals
                             "fastlb_sni_"))                          # [sni] routing outcomes
               for f in families), families
    # traffic goes to a only; the counters follow
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            assert s.recv(100).strip() == b"a"
    wait_for(lambda: scrape(mport)[1][("fastlb_server_sessions_total", "web", addr["a"], None)] == 5)
    m = scrape(mport)[1]
    assert m[("fastlb_backend_sessions_total", "web", None, None)] == 5
    lb.signal(signal.SIGTERM)
    assert lb.wait() == 0


def test_json_api_healthz_head_and_errors(procs, tmp_path):
    bport = start_backend(procs, "announce", name="a")[1]
    lb, _, mport = start(procs, tmp_path, [(bport, 7)])
    status, headers, body = get(mport, "/healthz")
    assert (status, body, headers["Content-Type"]) == (200, b"ok\n", "text/plain; charset=utf-8")
    status, headers, body = get(mport, "/api/stats")
    snap = json.loads(body)
    assert status == 200 and headers["Content-Type"] == "application/json"
    (web,) = snap["services"]
    assert web["name"] == "web" and web["backends"][0]["address"] == f"127.0.0.1:{bport}"
    assert web["backends"][0]["status"] == "UP" and web["backends"][0]["weight"] == 7
    status, _, body = get(mport, "/api/services")
    assert json.loads(body)[0]["backends"] == [{"address": f"127.0.0.1:{bport}", "weight": 7,
                                                "state": "ready"}]
    for path in ("/api/services", "/healthz", "/"):
        _, gh, gbody = get(mport, path)
        status, hh, hbody = get(mport, path, "HEAD")
        assert status == 200 and hbody == b""
        assert hh["Content-Length"] == gh["Content-Length"] == str(len(gbody))
    status, _, body = get(mport, "/nope")
    assert status == 404 and b"/metrics" in body
    status, headers, body = get(mport, "/metrics", "POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD" and body == b"read-only: GET or HEAD\n"
    status, _, _ = http(mport, b"GET / HTTP/1.1\r\nX: " + b"y" * 9000 + b"\r\n\r\n")
    assert status == 431
    status, _, _ = http(mport, b"BREW /pot HTCPCP/1.0\r\n\r\n")
    assert status == 505
    # keep-alive: two requests on one connection, the second closing it
    with socket.create_connection(("127.0.0.1", mport), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        first = s.recv(4096)
        assert first.startswith(b"HTTP/1.1 200") and b"Connection: keep-alive" in first
        s.sendall(b"HEAD /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        second = b""
        while chunk := s.recv(4096):
            second += chunk
        assert second.startswith(b"HTTP/1.1 200") and second.endswith(b"\r\n\r\n")
    lb.signal(signal.SIGTERM)
    assert lb.wait() == 0


def test_connection_cap_and_head_timeout(procs, tmp_path):
    bport = start_backend(procs, "announce", name="a")[1]
    lb, _, mport = start(procs, tmp_path, [(bport, 1)])
    idle = [socket.create_connection(("127.0.0.1", mport), timeout=15)
            for _ in range(httpapi.MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)
        status, _, body = get(mport, "/healthz")              # one over the cap
        assert status == 503 and b"too many" in body
        t0 = time.monotonic()
        data = idle[0].recv(4096)                              # silent clients time out
        assert data.startswith(b"HTTP/1.1 408")
        assert httpapi.HEAD_TIMEOUT - 0.5 < time.monotonic() - t0 + 0.3 < httpapi.HEAD_TIMEOUT + 3
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: get(mport, "/healthz")[0] == 200)         # freed slots serve again
    lb.signal(signal.SIGTERM)
    assert lb.wait() == 0


def test_retries_are_counted_on_the_backend_that_failed(procs, tmp_path):
    """HAProxy's wretr: a refused backend that a client is retried away from counts one retry
    on that backend (and in the service's sum); the backend that served counts none."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))                 # bound, never listening: connects are refused
    dead = held.getsockname()[1]
    try:
        _, good = start_backend(procs, "announce", name="b1")
        # the heavy refused backend is picked first (round robin by weight): one retry each time
        _, ports, mport = start(procs, tmp_path, [(dead, 10), (good, 1)], retries=1)
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", ports[0]), timeout=10) as s:
                assert s.recv(100) == b"b1\n"
        _, m = scrape(mport)
        retries = {srv: v for (name, proxy, srv, _), v in m.items()
                   if name == "fastlb_server_retry_warnings_total" and proxy == "web"}
        # every failed connect was followed by a retry on the good one (round robin's
        # max_fails = 1 drops the dead one's weight after its first failure: at least one)
        errors = m[("fastlb_server_connection_errors_total", "web", f"127.0.0.1:{dead}", None)]
        assert errors >= 1
        assert retries == {f"127.0.0.1:{dead}": errors, f"127.0.0.1:{good}": 0}
        assert m[("fastlb_backend_retry_warnings_total", "web", None, None)] == errors
    finally:
        held.close()
