"""Health checks, passive detection, slow start and panic mode, with real processes."""
import asyncio
import collections
import signal
import socket
import threading
import time

from fastlb.admin.client import AdminClient
from helpers import closed_port, service, start_backend, start_fastlb


def cfg(tmp_path, body):
    return f'[global]\nadmin = "unix:{tmp_path}/admin.sock"\n' + body


def health_of(tmp_path, svc="web"):
    with AdminClient(socket_path=f"{tmp_path}/admin.sock") as c:
        return {b["address"]: b["health"] for b in c.call("backends", service=svc)}


def wait_health(tmp_path, address, want, timeout=10.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if health_of(tmp_path)[address] == want:
            return time.monotonic() - t0
        time.sleep(0.01)
    raise AssertionError(f"{address} not {want} after {timeout}s")


def connect_names(port, count, source_ip=None):
    out, errors = [], 0
    for _ in range(count):
        try:
            s = socket.socket()
            if source_ip:
                s.bind((source_ip, 0))
            s.settimeout(5)
            s.connect(("127.0.0.1", port))
            out.append(s.recv(10).decode().strip())
            s.close()
        except OSError:
            errors += 1
    return out, errors


HEALTH = 'health = { interval = "200ms", timeout = "100ms", rise = 2, fall = 2, jitter = 0.1 }'


def test_killed_backend_goes_down_in_time_and_comes_back(procs, tmp_path):
    backs = {n: start_backend(procs, "announce", name=n) for n in "abc"}
    ports = {n: p for n, (_, p) in backs.items()}
    lb, (port,) = start_fastlb(procs, cfg(tmp_path, service("web", [(ports[n], 1) for n in "abc"],
                                                            health=HEALTH[9:])))
    c_addr = f"127.0.0.1:{ports['c']}"
    assert health_of(tmp_path)[c_addr] == "up"
    backs["c"][0].signal(signal.SIGKILL)
    backs["c"][0].wait()
    took = wait_health(tmp_path, c_addr, "down")
    assert took <= 2 * 0.2 * 1.1 + 0.1 + 0.3            # fall x interval (+jitter) + timeout + margin
    names, errors = connect_names(port, 100)
    assert errors == 0 and "c" not in names and len(names) == 100
    lb.wait_line(rf"web/{c_addr} DOWN: 2 checks failed")
    start_backend(procs, "announce", name="c", port=ports["c"])   # it restarts, same port
    wait_health(tmp_path, c_addr, "up")
    lb.wait_line(rf"web/{c_addr} UP: 2 checks passed")
    names, errors = connect_names(port, 30)
    assert errors == 0 and names.count("c") == 10


def test_slow_start_ramps_a_returning_backend(procs, tmp_path):
    (_, a), (pb, b) = start_backend(procs, "announce", name="a"), start_backend(procs, "announce", name="b")
    body = service("web", [(a, 1), (b, 1)],
                   health='{ interval = "100ms", timeout = "80ms", rise = 1, fall = 1, slowstart = "2s" }')
    lb, (port,) = start_fastlb(procs, cfg(tmp_path, body))
    pb.signal(signal.SIGKILL)
    pb.wait()
    wait_health(tmp_path, f"127.0.0.1:{b}", "down")
    start_backend(procs, "announce", name="b", port=b)
    wait_health(tmp_path, f"127.0.0.1:{b}", "up")
    t_up = time.monotonic()
    shares = collections.defaultdict(list)
    while time.monotonic() - t_up < 3.0:
        names, errors = connect_names(port, 20)
        assert errors == 0
        shares[int((time.monotonic() - t_up) / 0.5)].append(names.count("b") / len(names))
    avg = [sum(v) / len(v) for _, v in sorted(shares.items())]
    assert avg[0] < 0.25                                  # eased in...
    assert avg[0] < avg[2] < avg[-1] or avg[0] < avg[3]  # ...rising...
    assert abs(avg[-1] - 0.5) < 0.1                       # ...to its full share after the ramp


def test_passive_failures_mark_down_while_checks_pass(procs, tmp_path):
    _, a = start_backend(procs, "announce", name="a")
    _, check_only = start_backend(procs, "echo")          # the dead backend's check port passes
    dead = closed_port()
    body = (f'[[service]]\nname = "web"\nlisten = ["127.0.0.1:0"]\nretries = 2\n'
            f'health = {{ interval = "5s", timeout = "1s", rise = 1, fall = 3, fall_passive = 3 }}\n'
            f'backends = [ {{ address = "127.0.0.1:{a}" }}, '
            f'{{ address = "127.0.0.1:{dead}", health = {{ port = {check_only} }} }} ]\n')
    lb, (port,) = start_fastlb(procs, cfg(tmp_path, body))
    names, errors = connect_names(port, 30)
    assert errors == 0 and names == ["a"] * 30            # retried; no client saw an error
    assert health_of(tmp_path)[f"127.0.0.1:{dead}"] == "down"   # long before the next check
    lb.wait_line(rf"web/127.0.0.1:{dead} DOWN: 3 consecutive failures on client connections "
                 r"\(connection refused\)")


def test_send_expect_wrong_bytes_and_slow_replies_are_down(procs, tmp_path):
    _, good = start_backend(procs, "announce", name="pong")
    _, wrong = start_backend(procs, "announce", name="nope")
    _, slow = start_backend(procs, "announce", name="pong", delay=0.5)
    hc = ('{ kind = "send_expect", send = "PING\\r\\n", expect = "pong", interval = "300ms", '
          'timeout = "200ms", rise = 1, fall = 1 }')
    body = service("web", [(good, 1), (wrong, 1), (slow, 1)], health=hc)
    lb, (port,) = start_fastlb(procs, cfg(tmp_path, body))
    wait_health(tmp_path, f"127.0.0.1:{wrong}", "down")
    wait_health(tmp_path, f"127.0.0.1:{slow}", "down")
    time.sleep(0.5)
    assert health_of(tmp_path)[f"127.0.0.1:{good}"] == "up"
    # "nope\n" never matches and the backend keeps the connection open: the check times out
    # (a backend that closes after a wrong reply fails at once: tests/unit/test_health.py)
    lb.wait_line(rf"web/127.0.0.1:{wrong} DOWN: 1 check failed \(timeout after 0.2s\)")
    lb.wait_line(rf"web/127.0.0.1:{slow} DOWN: 1 check failed \(timeout after 0.2s\)")


def test_maglev_affinity_through_a_health_flap(procs, tmp_path):
    backs = [start_backend(procs, "announce", name=f"b{i}") for i in range(10)]
    body = service("web", [(p, 1) for _, p in backs], policy='"maglev"',
                   # fall = 2 and a 500 ms timeout: a loaded machine must not flap a healthy
                   # backend (that would move its keys too); the killed one still goes down fast
                   health='{ interval = "500ms", timeout = "500ms", rise = 1, fall = 2, jitter = 0 }')
    lb, (port,) = start_fastlb(procs, cfg(tmp_path, body))
    ips = [f"127.{1 + i // 62500}.{(i // 250) % 250}.{1 + i % 250}" for i in range(10_000)]

    async def route_all():
        sem = asyncio.Semaphore(64)

        async def one(ip):
            async with sem:
                r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(ip, 0))
                name = (await r.readline()).decode().strip()
                w.close()
                return name
        return await asyncio.gather(*(one(ip) for ip in ips))

    before = asyncio.run(route_all())
    victim_proc, victim_port = backs[3]
    victim_proc.signal(signal.SIGKILL)
    victim_proc.wait()
    wait_health(tmp_path, f"127.0.0.1:{victim_port}", "down")
    during = asyncio.run(route_all())
    start_backend(procs, "announce", name="b3", port=victim_port)
    wait_health(tmp_path, f"127.0.0.1:{victim_port}", "up")
    after = asyncio.run(route_all())
    moved_others = sum(1 for b, d in zip(before, during, strict=False) if b != "b3" and d != b)
    assert moved_others == 0                              # no key of the other nine moved
    assert all(d != "b3" for d in during)
    assert after == before                                # and all of b3's keys came back
    assert 500 < before.count("b3") < 1500


def test_panic_threshold_uses_all_backends(procs, tmp_path):
    names = "abcd"
    ports = {n: start_backend(procs, "announce", name=n)[1] for n in names}
    bad_check = closed_port()                             # b, c, d fail their checks but serve
    def body(threshold):
        bs = ", ".join(f'{{ address = "127.0.0.1:{ports[n]}"'
                       + (f', health = {{ port = {bad_check} }}' if n != "a" else "") + " }" for n in names)
        return (f'[[service]]\nname = "web"\nlisten = ["127.0.0.1:0"]\n'
                f'health = {{ interval = "100ms", timeout = "80ms", rise = 1, fall = 1, '
                f'panic_threshold = {threshold} }}\nbackends = [ {bs} ]\n')
    lb, (port,) = start_fastlb(procs, cfg(tmp_path, body(50)))
    for n in "bcd":
        wait_health(tmp_path, f"127.0.0.1:{ports[n]}", "down")
    got, errors = connect_names(port, 40)
    assert errors == 0 and set(got) == set(names)         # 25% up < 50%: all four are used
    lb.wait_line("entering panic mode: 1 of 4 backends up")
    lb.signal(signal.SIGKILL)
    lb.wait()
    lb2, (port2,) = start_fastlb(procs, f'[global]\nadmin = "unix:{tmp_path}/admin2.sock"\n' + body(0))
    time.sleep(0.5)
    got, errors = connect_names(port2, 20)
    assert errors == 0 and set(got) == {"a"}              # threshold 0: only the healthy one


def test_all_down_with_no_panic_closes_clients_promptly(procs, tmp_path):
    ports = [start_backend(procs, "announce", name=n)[1] for n in "ab"]
    body = service("web", [(p, 1) for p in ports],
                   health=f'{{ port = {closed_port()}, interval = "100ms", timeout = "80ms", '
                          'rise = 1, fall = 1 }')
    lb, (port,) = start_fastlb(procs, cfg(tmp_path, body))
    for p in ports:
        wait_health(tmp_path, f"127.0.0.1:{p}", "down")
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    t0 = time.monotonic()
    try:
        assert s.recv(10) == b""
    except ConnectionResetError:
        pass
    assert time.monotonic() - t0 < 0.5


def test_health_events_in_stats_and_subscribe(procs, tmp_path):
    bp, b = start_backend(procs, "announce", name="b")
    _, a = start_backend(procs, "announce", name="a")
    lb, _ = start_fastlb(procs, cfg(tmp_path, service("web", [(a, 1), (b, 1)], health=HEALTH[9:])))
    events = []
    sub = AdminClient(socket_path=f"{tmp_path}/admin.sock")
    threading.Thread(target=lambda: [events.append(e) for e in sub.events()], daemon=True).start()
    time.sleep(0.2)
    bp.signal(signal.SIGKILL)
    wait_health(tmp_path, f"127.0.0.1:{b}", "down")
    time.sleep(0.2)
    sub.close()
    ev = [e for e in events if e["op"] == "health"]
    assert ev and ev[0]["address"] == f"127.0.0.1:{b}" and ev[0]["health"] == "down"
    assert ev[0]["reason"].startswith("2 checks failed")
    with AdminClient(socket_path=f"{tmp_path}/admin.sock") as c:
        (web,) = c.call("stats")
        row = [r for r in web["backends"] if r["address"] == f"127.0.0.1:{b}"][0]
        assert row["health"] == "down" and row["check_failures"] >= 2
        assert row["health_reason"].startswith("2 checks failed")


def test_initial_down_waits_for_rise_checks(procs, tmp_path):
    _, a = start_backend(procs, "announce", name="a")
    _, b = start_backend(procs, "announce", name="b")
    body = service("web", [(a, 1), (b, 1)],
                   health='{ initial = "down", interval = "300ms", timeout = "100ms", rise = 2, jitter = 0 }')
    lb, (port,) = start_fastlb(procs, cfg(tmp_path, body))
    assert set(health_of(tmp_path).values()) == {"down"}        # no checks have passed yet
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        assert s.recv(10) == b""                                 # nothing up: closed at once
    except ConnectionResetError:
        pass
    took = wait_health(tmp_path, f"127.0.0.1:{a}", "up")
    assert 0.3 < took + 0.1 < 2.0                                # after 2 checks, not before
    names, errors = connect_names(port, 4)
    assert errors == 0 and sorted(names) == ["a", "a", "b", "b"]
