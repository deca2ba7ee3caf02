"""A small authoritative DNS server for the tests: UDP on loopback, in a thread of the test
process, built with dnspython's message API. Its answers can be changed while it runs.

    with DnsServer() as dns:                  # dns.port: point [global] dns.nameservers at it
        dns.set("app.test", A=["127.0.0.2"], AAAA=["::1"])
        dns.set("_app._tcp.test", SRV=[(1, 10, 9000, "a.test")])   # (priority, weight, port, target)
        dns.nxdomain("gone.test")             # or a name that was never set: NXDOMAIN too
        dns.silent = True                     # queries are read and dropped: the client times out

A name that is set but has no record of the asked type gets NOERROR with no answer (NODATA).
"""
from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

TTL = 1


class DnsServer:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.address = f"{host}:{self.port}"
        self.records: dict[str, dict[str, list]] = {}
        self.silent = False
        self.queries: list[tuple[str, str]] = []     # (name, type) of every query seen
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def set(self, name: str, **types: list) -> None:
        """Replace every record of ``name`` (A, AAAA: address texts; SRV: tuples)."""
        with self._lock:
            self.records[_key(name)] = {t: list(v) for t, v in types.items()}

    def nxdomain(self, name: str) -> None:
        with self._lock:
            self.records.pop(_key(name), None)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:  # noqa: BLE001 - not a DNS message: ignore it, as a server would
                continue
            if not query.question:
                continue
            q = query.question[0]
            name, rtype = _key(q.name.to_text()), dns.rdatatype.to_text(q.rdtype)
            with self._lock:
                self.queries.append((name, rtype))
                if self.silent:
                    continue
                records = self.records.get(name)
                response = dns.message.make_response(query)
                response.flags |= dns.flags.AA
                if records is None:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                else:
                    values = records.get(rtype, [])
                    if values:
                        texts = [" ".join(map(str, v)) if isinstance(v, tuple) else v for v in values]
                        texts = [_absolute_target(t) if rtype == "SRV" else t for t in texts]
                        response.answer.append(dns.rrset.from_text_list(
                            q.name, TTL, dns.rdataclass.IN, rtype, texts))
            try:
                self.sock.sendto(response.to_wire(), peer)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

    def __enter__(self) -> DnsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _key(name: str) -> str:
    return name.rstrip(".").lower()


def _absolute_target(text: str) -> str:
    """An SRV rdata "prio weight port target" with its target made absolute."""
    *head, target = text.split()
    return " ".join([*head, target if target.endswith(".") else target + "."])
