"""Listening sockets: the supervisor's, shared by every data path.

Owner: one listening socket per (service, host, port). New ones are bound in the prepare step
of a change (``bind``), before anything is persisted, so a port in use refuses the change and
changes nothing; ``adopt`` keeps them once the change is committed, ``discard`` closes them if
it is not. On stop, ``shutdown`` takes every socket out of the LISTEN state at once, in every
process that holds a duplicate (shutdown acts on the socket, not the descriptor): new clients
are refused at once, in every mode.
"""
from __future__ import annotations

import contextlib
import logging
import socket
from typing import Iterable, Mapping

from fastlb.errors import RegistryError
from fastlb.plan import ListenKey

log = logging.getLogger("fastlb")
LISTEN_BACKLOG = 4096


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening socket (IPv6 ones v6-only). Raises OSError naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    text = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {text}: {exc.strerror}") from None
    return sock


def fmt(sockaddr: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Listeners:
    def __init__(self) -> None:
        self.socks: dict[ListenKey, socket.socket] = {}

    def bind(self, wanted: Iterable[ListenKey], *, change: bool = True) -> dict[ListenKey, socket.socket]:
        """Bind the wanted keys not held yet; all or none (RegistryError "listen_failed",
        worded for a refused change, or with ``change=False`` for a service not started)."""
        new: dict[ListenKey, socket.socket] = {}
        held = {(k[1], k[2]): s for k, s in self.socks.items() if k[2] != 0}
        for key in sorted(set(wanted) - self.socks.keys()):
            if (key[1], key[2]) in held:        # [sni] an address changing hands (a service and
                new[key] = held[key[1], key[2]].dup()   # its SNI group): the same socket,
                continue                        # never closed, so no connect is refused
            try:
                new[key] = listen_socket(key[1], key[2])
            except OSError as exc:
                self.discard(new)
                why = exc.strerror or str(exc)
                raise RegistryError("listen_failed", f"service {key[0]}: {why}; nothing changed"
                                    if change else why) from None
        return new

    @staticmethod
    def discard(new: Mapping[ListenKey, socket.socket]) -> None:
        for sock in new.values():
            sock.close()

    def adopt(self, new: Mapping[ListenKey, socket.socket]) -> None:
        for key, sock in new.items():
            self.socks[key] = sock

    def close_unwanted(self, wanted: set[ListenKey]) -> None:
        """Close what no service listens on any more (the data paths already let go)."""
        for key in [k for k in self.socks if k not in wanted]:
            self.socks.pop(key).close()

    def shutdown(self) -> None:
        """Stop listening everywhere at once (see the module's docstring), then close ours."""
        for sock in self.socks.values():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
            sock.close()
        self.socks.clear()
