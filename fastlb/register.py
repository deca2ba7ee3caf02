"""Self-registration, from the instance's side: ``fastlb register`` and ``fastlb.Registration``.

Owner: keeping one registration alive against a fastlb's admin socket: register (a lease id),
renew every ttl/3, register again when the lease is lost (fastlb restarted without its state,
the lease expired while fastlb was unreachable: the renewal answers ``unknown_lease``), and
deregister at the end (SIGTERM/SIGINT for the command, leaving the ``async with`` block for the
API). The lease rules are fastlb.leases'; the ops, docs/admin-protocol.md.

    async with fastlb.Registration("web", "10.0.0.5:8080", ttl=10,
                                   socket="/run/fastlb/admin.sock") as reg:
        print(reg.lease)
        await serve_forever()

Renewing at a third of the TTL leaves two renewals to fail before the lease expires (etcd's
clients renew at a third too; Consul's TTL checks are usually updated at half). A failure is
retried at the next tick; the loop never stops on its own. Blocking calls (the admin client
is blocking: fastlb.admin.client) run in a thread, so the caller's event loop keeps running.
"""
from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from fastlb.admin.client import AdminClient
from fastlb.errors import AdminError

__all__ = ["Registration", "parse_ttl"]

log = logging.getLogger("fastlb.register")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
CALL_TIMEOUT = 5.0          # one admin request: a live fastlb answers in milliseconds
RETRY = 1.0                 # while fastlb cannot be reached or refuses: try again this often


def parse_ttl(text: str) -> float:
    """"10s", "500ms", "1m", or seconds; raises ValueError saying what is expected."""
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(f"{text!r}: expected a duration like \"10s\", \"1m\" or seconds")
    return float(m.group(1)) * _UNITS[m.group(2)]


class Registration:
    """One backend kept registered in a service while the ``async with`` block runs (or
    between ``start()`` and ``stop()``). Give ``socket`` (a unix admin socket) or ``tcp``
    ((host, port), with ``token``: the service's registration token or the operator's)."""

    def __init__(self, service: str, address: str, *, ttl: float = 10.0, weight: int | None = None,
                 metadata: dict[str, str] | None = None, socket: str | None = None,
                 tcp: tuple[str, int] | None = None, token: str | None = None,
                 timeout: float = CALL_TIMEOUT, tls: Any = None,
                 server_hostname: str | None = None) -> None:
        if (socket is None) == (tcp is None):
            raise ValueError("give exactly one of socket and tcp")
        self.service, self.address, self.ttl = service, address, float(ttl)
        self.weight, self.metadata = weight, metadata
        self.socket, self.tcp, self.token, self.timeout = socket, tcp, token, timeout
        self.tls, self.server_hostname = tls, server_hostname     # [tlsops] a TLS admin
        self.lease: str | None = None
        self.registrations = 0          # how many times a lease was granted (1 + re-registrations)
        self._client: AdminClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._problem = ""              # the last failure logged (one line per change)

    # -- the calls (blocking, in a thread) ----------------------------------------------------------
    def _call_blocking(self, op: str, fields: dict[str, Any]) -> Any:
        try:
            if self._client is None:
                self._client = AdminClient(socket_path=self.socket, tcp=self.tcp, token=self.token,
                                           timeout=self.timeout, tls=self.tls,
                                           server_hostname=self.server_hostname)   # [tlsops]
            return self._client.call(op, **fields)
        except (OSError, ConnectionError):
            if self._client is not None:
                self._client.close()
                self._client = None
            raise

    async def _call(self, op: str, **fields: Any) -> Any:
        return await asyncio.to_thread(self._call_blocking, op, fields)

    async def register(self) -> str:
        """Register (again): a new lease; raises AdminError or OSError."""
        fields: dict[str, Any] = {"service": self.service, "address": self.address, "ttl": self.ttl}
        if self.weight is not None:
            fields["weight"] = self.weight
        if self.metadata:
            fields["metadata"] = self.metadata
        result = await self._call("register", **fields)
        self.lease = str(result["lease"])
        self.registrations += 1
        log.info("registered %s in service %s: lease %s, ttl %gs", self.address, self.service,
                 self.lease, self.ttl)
        self._problem = ""
        return self.lease

    async def renew(self) -> None:
        """Renew the lease, or register again when fastlb no longer has it."""
        if self.lease is None:
            await self.register()
            return
        try:
            await self._call("renew", lease=self.lease)
        except AdminError as exc:
            if exc.code != "unknown_lease":
                raise
            log.warning("lease %s of %s lost (%s): registering again", self.lease, self.address,
                        exc.message)
            self.lease = None
            await self.register()
        self._problem = ""

    async def deregister(self) -> None:
        """Give the lease back (the backend drains out at once rather than at expiry)."""
        lease, self.lease = self.lease, None
        if lease is None:
            return
        try:
            await self._call("deregister", lease=lease)
            log.info("deregistered %s from service %s (lease %s)", self.address, self.service, lease)
        except AdminError as exc:
            if exc.code != "unknown_lease":
                raise

    # -- the loop -------------------------------------------------------------------------------
    async def keep(self) -> None:
        """Renew at ttl/3 (register first if needed) until cancelled; failures are logged (once
        per change) and retried."""
        while True:
            try:
                await self.renew()
                delay = self.ttl / 3
            except (AdminError, OSError, ConnectionError) as exc:
                words = str(exc) or type(exc).__name__
                if words != self._problem:
                    log.warning("registration of %s in service %s: %s; retrying", self.address,
                                self.service, words)
                    self._problem = words
                delay = min(RETRY, self.ttl / 3)
            await asyncio.sleep(delay)

    async def start(self) -> "Registration":
        """Register (raises when that fails), then keep the lease in the background."""
        await self.register()
        self._task = asyncio.get_running_loop().create_task(self._keep_after_first())
        return self

    async def _keep_after_first(self) -> None:
        await asyncio.sleep(self.ttl / 3)
        await self.keep()

    async def stop(self) -> None:
        """Stop renewing and deregister (best effort: fastlb may be gone)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        try:
            await self.deregister()
        except (AdminError, OSError, ConnectionError) as exc:
            log.warning("deregistering %s: %s (the lease expires on its own)", self.address, exc)
        finally:
            if self._client is not None:
                self._client.close()
                self._client = None

    async def __aenter__(self) -> "Registration":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def main(args: Any) -> int:
    """``fastlb register SERVICE ADDRESS --ttl 10s``: until SIGTERM/SIGINT, then deregister."""
    import signal
    import sys

    from fastlb import ctl
    try:
        ttl = parse_ttl(args.ttl)
    except ValueError as exc:
        print(f"fastlb register: --ttl {exc}", file=sys.stderr)
        return 2
    try:
        target = ctl.target(args)
    except SystemExit as exc:
        print(exc.code, file=sys.stderr)
        return 2
    meta = {}
    for item in args.meta or ():
        key, sep, value = item.partition("=")
        if not sep:
            print(f"fastlb register: --meta {item!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        meta[key] = value
    logging.basicConfig(level=logging.INFO, format="fastlb register: %(message)s", stream=sys.stderr)
    reg = Registration(args.service, args.address, ttl=ttl, weight=args.weight, metadata=meta or None,
                       **target)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        task = loop.create_task(reg.keep())        # registers first, retrying until it can
        await stop.wait()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        await reg.stop()

    asyncio.run(run())
    return 0
