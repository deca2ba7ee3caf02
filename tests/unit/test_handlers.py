"""Admin reads as pure functions of a registry snapshot and a stats view; the op table."""
import asyncio

import pytest

from fastlb import _core, config, handlers
from fastlb.admin.protocol import AdminProtocolError, OPS, MUTATIONS, Request
from fastlb.errors import RegistryError

SNAP = {s.name: s for s in config.loads('''
[[service]]
name = "web"
listen = ["127.0.0.1:8080"]
backends = [ { address = "10.0.0.1:80", weight = 2 }, { address = "10.0.0.2:80", state = "drain" } ]
''', resolve=False).services}


class View:
    def slot(self, service, address):
        return {"10.0.0.1:80": 4}.get(address)

    def is_up(self, slot):
        return slot == 4

    def counters(self, slot):
        return {"active": 1, "total": 9, "bytes_in": 10, "bytes_out": 20, "connect_failures": 0}

    def check(self, service, address):
        return (3, "3 checks failed (refused)") if address == "10.0.0.2:80" else None

    maxconn = 100

    def gauges(self, service, address=""):
        row = dict.fromkeys(_core.GAUGE_FIELDS, 0)
        row["cur"] = 7 if service is None else 5 if address == "" else 2
        row["queue_full"] = 3 if service is not None and address == "" else 0
        return row


def test_reads_are_functions_of_snapshot_and_view():
    assert handlers.services(SNAP) == [{"name": "web", "listen": ["127.0.0.1:8080"],
                                        "policy": "round_robin", "backends": 2}]
    assert handlers.backends(SNAP, View(), "web") == [
        {"address": "10.0.0.1:80", "weight": 2, "state": "ready", "health": "up"},
        {"address": "10.0.0.2:80", "weight": 1, "state": "drain", "health": "down"}]
    (web,) = handlers.stats(SNAP, View())
    a, b = web["backends"]
    assert (a["total"], a["check_failures"], a["health_reason"]) == (9, 0, "no checks")
    assert (b["total"], b["check_failures"], b["health_reason"]) == (0, 3, "3 checks failed (refused)")
    assert handlers.stats(SNAP, View()) == handlers.stats(SNAP, View())
    # [limits] the gauges: per backend (cur, max, limit), per service and the whole balancer
    assert (a["cur"], a["limit"]) == (2, 0)
    assert (web["limits"]["cur"], web["limits"]["queue_full"], web["limits"]["limit"]) == (5, 3, 0)
    assert (web["global"]["cur"], web["global"]["limit"]) == (7, 100)
    assert set(_core.GAUGE_FIELDS) <= set(web["limits"]) and set(_core.GAUGE_FIELDS) <= set(web["global"])
    with pytest.raises(RegistryError, match="no service 'nope'; services: web"):
        handlers.backends(SNAP, View(), "nope")


def test_every_op_of_the_protocol_has_a_handler():
    served = set(handlers.HANDLERS) | MUTATIONS | {"subscribe"}      # subscribe: the server's
    served |= handlers.LEASE_OPS                                    # [leases] Context.lease
    assert served == set(OPS)

    class Ctx:
        snapshot, view = SNAP, View()

    assert asyncio.run(handlers.dispatch(Ctx(), Request(1, "ping"))) == "pong"
    with pytest.raises(AdminProtocolError):
        asyncio.run(handlers.dispatch(Ctx(), Request(2, "nope")))
