"""[tlsops] Session ticket keys shared by every worker, with rotation (issue 12).

Owner: the supervisor's key rings, one per TLS service. Each ring holds three keys, HAProxy's
TLS_TICKETS_NO scheme (ssl_sock.c, `tls-ticket-keys`): previous, current, next. The current key
encrypts new tickets, all three decrypt. Every ``tls.ticket_lifetime`` the ring turns: the
previous key is dropped, the current one becomes the previous, the next one the current, and a
new random key the next. So a key decrypts for two periods after it started encrypting (and
one before: a worker that got the turn a moment later still reads the tickets of one that got
it first), and a ticket from before two turns is refused (a full handshake).

Rules: keys come from os.urandom and are never written anywhere (unless the user gives them:
``tls.ticket_keys``, a file in HAProxy's `tls-ticket-keys` form, whose last three keys are the
ring, the last but one encrypting; such a ring never turns by itself: the user appends a key and
reloads, as with HAProxy); they reach the workers over
their control channels (``{"tickets": {service: 240 bytes}}``, fastlb.pool) and the single
process data path directly; they live as long as the supervisor (a reload or a worker restart
keeps them: a restarted worker gets them before its first snapshot). A service whose TLS is
removed loses its ring; one added gets a new one. Key form: 80 bytes, HAProxy's order: name
(16) | AES-256 key (32) | HMAC-SHA256 key (32) (fastlb/_tls.h, flb_ticket_cb).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

KEY_SIZE = 80
KEYS = 3              # previous, current, next (HAProxy's TLS_TICKETS_NO)


@dataclass
class Ring:
    period: float
    due: float                                  # monotonic time of the next turn
    keys: list[bytes] = field(default_factory=list)
    turns: int = 0
    fixed: bool = False                         # the user's keys (tls.ticket_keys): no timer


class TicketKeys:
    """The rings of every TLS service. ``now``: a monotonic clock; ``rand``: os.urandom."""

    def __init__(self, now: Callable[[], float], rand: Callable[[int], bytes] = os.urandom) -> None:
        self.now, self.rand = now, rand
        self.rings: dict[str, Ring] = {}

    def sync(self, lifetimes: Mapping[str, float], given: Mapping[str, bytes] | None = None) -> bool:
        """The TLS services and their tls.ticket_lifetime (seconds) now, and ``given``: the
        services with tls.ticket_keys (the last three keys, 240 bytes): new rings for new
        services, none for removed ones, a changed period from the next turn, the user's keys
        as they are now. True when the keys changed (the data paths need them)."""
        changed = False
        given = given or {}
        for name in [n for n in self.rings if n not in lifetimes]:
            del self.rings[name]
            changed = True
        for name, period in lifetimes.items():
            ring = self.rings.get(name)
            if name in given:
                keys = [given[name][i:i + KEY_SIZE] for i in range(0, KEYS * KEY_SIZE, KEY_SIZE)]
                if ring is None or ring.keys != keys or not ring.fixed:
                    self.rings[name] = Ring(period, float("inf"), keys, fixed=True)
                    changed = True
                continue
            if ring is not None and ring.fixed:     # the file was dropped: random keys again
                ring = None
            if ring is None:
                self.rings[name] = Ring(period, self.now() + period,
                                        [self.rand(KEY_SIZE) for _ in range(KEYS)])
                changed = True
            elif ring.period != period:
                ring.period = period
                ring.due = min(ring.due, self.now() + period)
        return changed

    def turn(self, name: str) -> None:
        """Turn one ring now (the timer, or the admin's rotate_tickets)."""
        ring = self.rings[name]
        ring.keys = [*ring.keys[1:], self.rand(KEY_SIZE)]
        ring.turns += 1
        ring.due = self.now() + ring.period

    def turn_due(self) -> bool:
        """Turn the rings whose period is over; True when any did."""
        now = self.now()
        due = [n for n, r in self.rings.items() if r.due <= now]
        for name in due:
            self.turn(name)
        return bool(due)

    def next_due(self) -> float | None:
        return min((r.due for r in self.rings.values()), default=None)

    def wire(self) -> dict[str, bytes]:
        """service -> its three keys, 240 bytes (what the data paths take)."""
        return {n: b"".join(r.keys) for n, r in self.rings.items()}

    def info(self) -> dict[str, dict[str, Any]]:
        """Per service: the period and the turns so far (ctl stats, /api/stats)."""
        return {n: {"ticket_lifetime": r.period, "rotations": r.turns,
                    **({"keys": "file"} if r.fixed else {})} for n, r in self.rings.items()}
