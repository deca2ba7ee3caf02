"""Listening sockets: the supervisor's, shared by every data path.

Owner: one listening socket per (service, host, port). New ones are bound in the prepare step
of a change (``bind``), before anything is persisted, so a port in use refuses the change and
changes nothing; ``adopt`` keeps them once the change is committed, ``discard`` closes them if
it is not. On stop, ``shutdown`` takes every socket out of the LISTEN state at once, in every
process that holds a duplicate (shutdown acts on the socket, not the descriptor): new clients
are refused at once, in every mode.
[listenopts] A socket's options (TCP_DEFER_ACCEPT, TCP_FASTOPEN: service.defer_accept and
fastopen) are set before it listens; a change of them is set on the socket held (``configure``,
once the change is committed), never by binding again: no client is refused by a reload.
"""
from __future__ import annotations

import contextlib
import logging
import socket
from typing import Any, Iterable, Mapping

from fastlb.errors import RegistryError
from fastlb.plan import SNI_GROUP, ListenKey

log = logging.getLogger("fastlb")
LISTEN_BACKLOG = 4096

# -- [listenopts] listener options (config.defer_accept_seconds, config.fastopen_queue) ----------
ListenOpts = tuple[int, int]      # (TCP_DEFER_ACCEPT seconds, TCP_FASTOPEN queue length), 0: off
NO_OPTS: ListenOpts = (0, 0)      # what a new socket has (the kernel's defaults)
TFO_SYSCTL = "/proc/sys/net/ipv4/tcp_fastopen"
TFO_SERVER_ENABLE = 0x2           # the sysctl's bit for server TFO (Documentation/networking/ip-sysctl)


def set_listen_opts(sock: socket.socket, opts: ListenOpts, was: ListenOpts = NO_OPTS) -> None:
    """Set on ``sock`` the options of ``opts`` that differ from ``was`` (what it has now).
    Only a change is set, as HAProxy does for TFO (tcp_bind_listener: it is turned off only on
    a socket that had it, "we don't want the kernel to create a fast open queue if there's
    none") and nginx for TCP_DEFER_ACCEPT on a reload (add_deferred / delete_deferred, in
    ngx_configure_listening_sockets). Raises OSError."""
    if opts[0] != was[0]:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, opts[0])
    if opts[1] != was[1]:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, opts[1])


def listen_opts(keys: Iterable[ListenKey], services: Mapping[str, Any]) -> dict[ListenKey, ListenOpts]:
    """The options of each listening socket of ``keys``: its service's (a config Service:
    .defer_accept, .fastopen, .listen); an SNI group's socket, its services' (they agree:
    config.listen_opts_clash refuses a config or an add_service where they do not)."""
    by_addr = {(a.host, a.port): (s.defer_accept, s.fastopen)
               for s in services.values() for a in s.listen if a.port != 0}
    out: dict[ListenKey, ListenOpts] = {}
    for key in keys:
        svc = services.get(key[0])
        out[key] = ((svc.defer_accept, svc.fastopen) if svc is not None
                    else by_addr.get((key[1], key[2]), NO_OPTS))
    return out


def tfo_server_allowed(sysctl: int) -> bool:
    """net.ipv4.tcp_fastopen lets listeners take data in the SYN (bit 0x2; 0x400 and the others
    only widen it). Without it TCP_FASTOPEN is accepted but does nothing."""
    return bool(sysctl & TFO_SERVER_ENABLE)


def tfo_problem(path: str = TFO_SYSCTL) -> str | None:
    """Why a listener's fastopen will not work on this machine (the sysctl, read now), or None."""
    try:
        with open(path) as f:
            value = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None                   # not Linux, or no /proc: nothing to say
    if tfo_server_allowed(value):
        return None
    return (f"net.ipv4.tcp_fastopen = {value} does not allow server TCP Fast Open (bit 0x2); "
            f"connections are accepted as usual, without the data in the SYN, until it does: "
            f"sysctl -w net.ipv4.tcp_fastopen={value | TFO_SERVER_ENABLE} (and the same in "
            f"/etc/sysctl.d/ to keep it)")


def _opts_words(opts: ListenOpts) -> str:
    return (f"defer_accept {f'{opts[0]}s' if opts[0] else 'off'}, "
            f"fastopen {opts[1] if opts[1] else 'off'}")


def listen_socket(host: str, port: int, opts: ListenOpts = NO_OPTS) -> socket.socket:
    """A listening socket (IPv6 ones v6-only) with ``opts`` ([listenopts]). Raises OSError
    naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    text = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        set_listen_opts(sock, opts)                     # [listenopts] before any client queues
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
        # [listenopts] the options each socket has, bound or held (a key missing: NO_OPTS), and
        # the sockets with fastopen the sysctl was last checked for (configure)
        self.opts: dict[ListenKey, ListenOpts] = {}
        self._tfo_checked: frozenset[ListenKey] = frozenset()

    def bind(self, wanted: Iterable[ListenKey], *, change: bool = True,
             opts: Mapping[ListenKey, ListenOpts] | None = None) -> dict[ListenKey, socket.socket]:
        """Bind the wanted keys not held yet, with their ``opts`` ([listenopts]; default: none);
        all or none (RegistryError "listen_failed", worded for a refused change, or with
        ``change=False`` for a service not started)."""
        new: dict[ListenKey, socket.socket] = {}
        held = {(k[1], k[2]): s for k, s in self.socks.items() if k[2] != 0}
        held_key = {(k[1], k[2]): k for k in self.socks if k[2] != 0}               # [listenopts]
        for key in sorted(set(wanted) - self.socks.keys()):
            if (key[1], key[2]) in held:        # [sni] an address changing hands (a service and
                new[key] = held[key[1], key[2]].dup()   # its SNI group): the same socket,
                self.opts[key] = self.opts.get(held_key[key[1], key[2]], NO_OPTS)   # [listenopts]
                continue                        # never closed, so no connect is refused
            want = (opts or {}).get(key, NO_OPTS)                                   # [listenopts]
            try:
                new[key] = listen_socket(key[1], key[2], want)
                self.opts[key] = want                                               # [listenopts]
            except OSError as exc:
                self.discard(new)
                why = exc.strerror or str(exc)
                raise RegistryError("listen_failed", f"service {key[0]}: {why}; nothing changed"
                                    if change else why) from None
        return new

    def discard(self, new: Mapping[ListenKey, socket.socket]) -> None:
        for key, sock in new.items():
            if key not in self.socks:           # [listenopts] (a key held is never in new)
                self.opts.pop(key, None)
            sock.close()

    def configure(self, wanted: Mapping[ListenKey, ListenOpts]) -> None:
        """[listenopts] Give the sockets held the options ``wanted`` where they differ (a
        reload, an add_service joining an address): setsockopt on the socket itself, which
        every data path shares, so the next client is accepted with them. Called once a
        change is committed: a failure (not expected: the values were validated) is logged
        and the socket keeps what it had. Warns when a socket newly asks for fastopen and the
        sysctl does not allow it (tfo_problem)."""
        for key, want in sorted(wanted.items()):
            sock = self.socks.get(key)
            was = self.opts.get(key, NO_OPTS)
            if sock is None or want == was:
                continue
            where = f"service {key[0]}" if key[0] != SNI_GROUP else "SNI routing"
            try:
                set_listen_opts(sock, want, was)
            except OSError as exc:
                log.error("%s: the listening socket of %s: cannot set %s: %s; it keeps %s",
                          where, fmt(sock.getsockname()), _opts_words(want),
                          exc.strerror or exc, _opts_words(was))
                continue
            self.opts[key] = want
            log.info("%s: the listening socket of %s has %s now (set on the socket held: "
                     "not bound again)", where, fmt(sock.getsockname()), _opts_words(want))
        tfo = frozenset(k for k, o in wanted.items() if o[1])
        if tfo - self._tfo_checked and (problem := tfo_problem()) is not None:
            names = sorted({k[0] if k[0] != SNI_GROUP else f"{k[1]}:{k[2]}" for k in tfo})
            log.warning("fastopen (services %s): %s", ", ".join(names), problem)
        self._tfo_checked = tfo

    def adopt(self, new: Mapping[ListenKey, socket.socket]) -> None:
        for key, sock in new.items():
            self.socks[key] = sock

    def close_unwanted(self, wanted: set[ListenKey]) -> None:
        """Close what no service listens on any more (the data paths already let go)."""
        for key in [k for k in self.socks if k not in wanted]:
            self.socks.pop(key).close()
            self.opts.pop(key, None)                                            # [listenopts]

    def shutdown(self) -> None:
        """Stop listening everywhere at once (see the module's docstring), then close ours."""
        for sock in self.socks.values():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
            sock.close()
        self.socks.clear()
        self.opts.clear()                                                       # [listenopts]
