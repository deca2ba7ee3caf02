"""The registry: services and their backends, the one source of truth while fastlb runs.

Owner: what services and backends exist, their weights and states. No I/O here: mutations are
two-phase (STYLE.md point 9). ``plan(op, args)`` validates and returns the next snapshot and an
event, changing nothing; the caller persists the snapshot, then ``commit``s it and applies it to
the data path. A snapshot is an immutable mapping name -> config.Service (frozen dataclasses), so
readers can hold one while the next is built.

Backends are identified within their service by their address text ("host:port", as given; an
SRV entry by its name), never by an IP a host name resolves to: the registry and the state file
hold no DNS answer (fastlb.dns keeps those, as derived state).
"""
from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Mapping

from fastlb import config
from fastlb.config import Backend, Service
from fastlb.errors import ConfigError, RegistryError

__all__ = ["Registry", "RegistryError", "Snapshot", "reconcile"]

Snapshot = Mapping[str, Service]


def _find(svc: Service, address: str) -> int:
    for i, b in enumerate(svc.backends):
        if b.address.text == address:
            return i
    raise RegistryError("unknown_backend", f"service {svc.name!r} has no backend {address!r}")


def _with_backends(svc: Service, backends: list[Backend]) -> Service:
    return dataclasses.replace(svc, backends=tuple(backends))


class Registry:
    """Holds the current snapshot and its generation (bumped on every commit)."""

    def __init__(self, services: Mapping[str, Service]) -> None:
        self.snapshot: Snapshot = MappingProxyType(dict(services))
        self.generation = 0

    def service(self, name: str) -> Service:
        try:
            return self.snapshot[name]
        except KeyError:
            raise RegistryError("unknown_service", f"no service {name!r}; services: "
                                f"{', '.join(sorted(self.snapshot)) or '(none)'}") from None

    def plan(self, op: str, args: dict[str, Any], *,
             resolve: bool = True) -> tuple[dict[str, Service], dict[str, Any]]:
        """Validate ``op`` on the current snapshot. Returns (next services, event).

        ``args`` have been type-checked by the admin protocol; this checks them against the
        registry (unknown service, duplicate backend, ...) and raises RegistryError.
        """
        nxt = dict(self.snapshot)
        event: dict[str, Any] = {"op": op}
        if op == "add_service":
            try:
                svc = config.service_from_dict(args["service"], "service", resolve=resolve)
            except ConfigError as exc:
                raise RegistryError("invalid", str(exc)) from None
            if svc.name in nxt:
                raise RegistryError("exists", f"service {svc.name!r} already exists")
            clash = config.sni_clash(nxt.values(), svc)                          # [sni]
            if clash is not None:
                raise RegistryError("invalid", f"service.{clash[0]}: {clash[1]}")
            taken = {(a.host, a.port): s.name for s in nxt.values() for a in s.listen}
            for a in svc.listen:
                if (a.host, a.port) in taken and a.port != 0 and not config.sni_shares(
                        [*nxt.values(), svc], a):                                   # [sni]
                    raise RegistryError("exists", f"{a.text} is already a listener of service "
                                                  f"{taken[(a.host, a.port)]!r}")
            clash = config.listen_opts_clash(nxt.values(), svc)                  # [listenopts]
            if clash is not None:
                raise RegistryError("invalid", f"service.{clash[0]}: {clash[1]}")
            nxt[svc.name] = svc
            event["service"] = svc.name
            return nxt, event
        svc = self.service(args["service"])
        event["service"] = svc.name
        if op == "remove_service":
            del nxt[svc.name]
            return nxt, event
        backends = list(svc.backends)
        address = args["address"]
        event["address"] = address
        if op == "add_backend":
            if any(b.address.text == address for b in backends):
                raise RegistryError("exists", f"service {svc.name!r} already has backend {address!r}")
            try:
                # [dns] a host name is kept as written (fastlb.dns follows it), never resolved
                addr = config.parse_address(address, resolve=False)
            except ValueError as exc:
                raise RegistryError("invalid", f"address: {exc}") from None
            if addr.port == 0:
                raise RegistryError("invalid", "address: a backend needs a port from 1 to 65535")
            # [leases] with the service's health checks, as a backend of the config gets them
            # (config.service_from_dict); without, an added backend was never checked
            b = Backend(addr, args.get("weight", 1), args.get("state", "ready"), svc.health)
            backends.append(b)
            event.update(weight=b.weight, state=b.state)
        else:
            i = _find(svc, address)
            if op == "remove_backend":
                del backends[i]
            elif op == "set_weight":
                backends[i] = dataclasses.replace(backends[i], weight=args["weight"])
                event["weight"] = args["weight"]
            elif op == "set_state":
                backends[i] = dataclasses.replace(backends[i], state=args["state"])
                event["state"] = args["state"]
            elif op == "set_max_conns":                                          # [limits]
                backends[i] = dataclasses.replace(backends[i], max_conns=args["max_conns"])
                event["max_conns"] = args["max_conns"]
            else:
                raise RegistryError("unknown_op", f"unknown registry op {op!r}")
        nxt[svc.name] = _with_backends(svc, backends)
        return nxt, event

    def commit(self, services: dict[str, Service]) -> int:
        self.snapshot = MappingProxyType(services)
        self.generation += 1
        return self.generation


def reconcile(current: Mapping[str, Service], old_config: Mapping[str, Service],
              new_config: Mapping[str, Service]) -> dict[str, Service]:
    """Apply the difference between two configs to the current registry.

    Used at start (old_config = the config recorded in the state file) and by ``reload``. What
    the config did not change keeps its run-time value (admin changes survive); what it changed
    takes the new config's value. Precisely, per service name:
      - only in new_config: added (replacing a run-time service of that name);
      - only in old_config: removed;
      - in both and changed: the service's settings come from new_config, and its backends are
        the current ones, minus those new_config removed, plus those it added, with weight and
        state from new_config for those whose config entry changed.
    """
    out = dict(current)
    for name in old_config.keys() - new_config.keys():
        out.pop(name, None)
    for name, new in new_config.items():
        old = old_config.get(name)
        if old is None or name not in out:
            out[name] = new
            continue
        if old == new:
            continue
        cur = out[name]
        old_b = {b.address.text: b for b in old.backends}
        new_b = {b.address.text: b for b in new.backends}
        backends = []
        for b in cur.backends:
            key = b.address.text
            if key in old_b and key not in new_b:
                continue                                   # removed in the config
            if key in new_b and old_b.get(key) != new_b[key]:
                b = new_b[key]                             # changed (or added) in the config
            backends.append(b)
        have = {b.address.text for b in backends}
        backends += [b for k, b in new_b.items() if k not in have and k not in old_b]
        out[name] = dataclasses.replace(new, backends=tuple(backends))
    return out
