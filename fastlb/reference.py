"""Slow, obviously correct pure-Python twins of the Cython core (tests and benchmarks only).

Owner: the definition of what each policy must answer. Each class mirrors the contract of its
fastlb._core counterpart: same constructor data, same ``pick(key, tried)``, same random stream
(splitmix64) so that property tests can demand identical sequences. Health is read through any
object with ``is_up(slot)`` and ``generation`` (a HealthBitmap, or RefHealth below).
Clarity over speed everywhere: no caching the core does not also need to be observable.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

MASK64 = (1 << 64) - 1
P1, P2, P3, P4, P5 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                      0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5)
MAGLEV_SEED_OFFSET = 0x5BD1E995
MAGLEV_SEED_SKIP = 0x1B873593


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & MASK64


def _round(acc: int, lane: int) -> int:
    return (_rotl((acc + lane * P2) & MASK64, 31) * P1) & MASK64


def xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64, straight from the xxHash specification."""
    n = len(data)
    p = 0
    if n >= 32:
        v = [(seed + P1 + P2) & MASK64, (seed + P2) & MASK64, seed, (seed - P1) & MASK64]
        while p + 32 <= n:
            for k in range(4):
                v[k] = _round(v[k], int.from_bytes(data[p + 8 * k:p + 8 * k + 8], "little"))
            p += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & MASK64
        for k in range(4):
            h = ((h ^ _round(0, v[k])) * P1 + P4) & MASK64
    else:
        h = (seed + P5) & MASK64
    h = (h + n) & MASK64
    while p + 8 <= n:
        h ^= _round(0, int.from_bytes(data[p:p + 8], "little"))
        h = (_rotl(h, 27) * P1 + P4) & MASK64
        p += 8
    if p + 4 <= n:
        h ^= (int.from_bytes(data[p:p + 4], "little") * P1) & MASK64
        h = (_rotl(h, 23) * P2 + P3) & MASK64
        p += 4
    while p < n:
        h ^= (data[p] * P5) & MASK64
        h = (_rotl(h, 11) * P1) & MASK64
        p += 1
    h ^= h >> 33
    h = (h * P2) & MASK64
    h ^= h >> 29
    h = (h * P3) & MASK64
    return h ^ (h >> 32)


class SplitMix64:
    def __init__(self, seed: int) -> None:
        self.state = seed & MASK64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)


class RefHealth:
    """A plain set of up slots with a generation, for tests without shared memory."""

    def __init__(self, up: Iterable[int] = ()) -> None:
        self.up = set(up)
        self.generation = 0

    def is_up(self, slot: int) -> bool:
        return slot in self.up

    def set(self, slot: int, up: bool) -> None:
        if (slot in self.up) != up:
            (self.up.add if up else self.up.discard)(slot)
            self.generation += 1


class RefRoundRobin:
    """nginx's smooth weighted round-robin (ngx_stream_upstream_get_peer), line by line."""

    def __init__(self, slots: Sequence[int], weights: Sequence[int], health, max_fails: int = 1):
        self.slots, self.weights, self.health = list(slots), list(weights), health
        self.max_fails = max_fails
        self.current = [0] * len(slots)
        self.effective = list(weights)

    def pick(self, key: int = 0, tried: Iterable[int] = ()) -> int:
        tried = set(tried)
        best, total = None, 0
        for i, slot in enumerate(self.slots):
            if not self.health.is_up(slot) or slot in tried:
                continue
            self.current[i] += self.effective[i]
            total += self.effective[i]
            if self.effective[i] < self.weights[i]:
                self.effective[i] += 1
            if best is None or self.current[i] > self.current[best]:
                best = i
        if best is None:
            return -1
        self.current[best] -= total
        return self.slots[best]

    def report_failure(self, slot: int) -> None:
        if slot in self.slots:
            i = self.slots.index(slot)
            self.effective[i] = max(0, self.effective[i] - self.weights[i] // self.max_fails)


class RefWeightedRandom:
    """Vose's alias method with integer arithmetic, rebuilt when health's generation moves."""

    def __init__(self, slots, weights, health, seed: int = 0) -> None:
        self.slots, self.weights, self.health = list(slots), list(weights), health
        self.rng = SplitMix64(seed)
        self._rebuild()

    def _rebuild(self) -> None:
        self.gen = self.health.generation
        self.usable = [i for i, s in enumerate(self.slots) if self.health.is_up(s)]
        m = len(self.usable)
        self.total = sum(self.weights[i] for i in self.usable)
        self.prob = [self.weights[i] * m for i in self.usable]
        self.alias = list(range(m))
        small = [j for j in range(m) if self.prob[j] < self.total]
        large = [j for j in range(m) if self.prob[j] >= self.total]
        while small and large:
            lo, hi = small.pop(), large.pop()
            self.alias[lo] = hi
            self.prob[hi] -= self.total - self.prob[lo]
            (small if self.prob[hi] < self.total else large).append(hi)
        for j in large + small:
            self.prob[j] = self.total

    def _fresh(self) -> bool:
        if self.health.generation != self.gen:
            self._rebuild()
        return bool(self.usable)

    def _draw(self) -> int:
        j = self.rng.next() % len(self.usable)
        if self.rng.next() % self.total >= self.prob[j]:
            j = self.alias[j]
        return self.usable[j]

    def _slow_draw(self, tried: set[int]) -> int:
        ok = [i for i, s in enumerate(self.slots) if self.health.is_up(s) and s not in tried]
        if not ok:
            return -1
        t = self.rng.next() % sum(self.weights[i] for i in ok)
        for i in ok:
            if t < self.weights[i]:
                return i
            t -= self.weights[i]
        raise AssertionError("unreachable")

    def pick(self, key: int = 0, tried: Iterable[int] = ()) -> int:
        tried = set(tried)
        if not self._fresh():
            return -1
        if not tried:
            i = self._draw()
            if self.health.is_up(self.slots[i]):
                return self.slots[i]
        i = self._slow_draw(tried)
        return -1 if i < 0 else self.slots[i]


class RefLeastConn(RefWeightedRandom):
    """Weighted power of two choices: the smaller (active + 1) / weight wins, first on a tie.

    ``active`` is a callable slot -> current active connections.
    """

    def __init__(self, slots, weights, health, active, seed: int = 0) -> None:
        self.active = active
        super().__init__(slots, weights, health, seed)

    def _better(self, a: int, b: int) -> int:
        ca = self.active(self.slots[a]) + 1
        cb = self.active(self.slots[b]) + 1
        return b if cb * self.weights[a] < ca * self.weights[b] else a

    def pick(self, key: int = 0, tried: Iterable[int] = ()) -> int:
        tried = set(tried)
        if not self._fresh():
            return -1
        if not tried:
            a, b = self._draw(), self._draw()
            if self.health.is_up(self.slots[a]) and self.health.is_up(self.slots[b]):
                return self.slots[self._better(a, b)]
        a = self._slow_draw(tried)
        if a < 0:
            return -1
        return self.slots[self._better(a, self._slow_draw(tried))]


def is_prime(m: int) -> bool:
    return m >= 2 and all(m % d for d in range(2, int(m ** 0.5) + 1))


class RefMaglev:
    """Weighted Maglev (Katran V2 population), lookup probing past down/tried/overloaded slots.

    ``balance_factor`` is HAProxy's hash-balance-factor (a percent, 0 = off): a usable slot is
    taken only while (active + 1) / weight <= factor% x (total active + 1) / (total weight),
    over the usable slots; when none qualifies, the first usable one in probe order.
    """

    def __init__(self, slots, weights, health, ids=None, table_size: int | None = None,
                 balance_factor: int = 0, active=None) -> None:
        self.slots, self.weights, self.health = list(slots), list(weights), health
        n = len(self.slots)
        ids = [str(s) for s in self.slots] if ids is None else list(ids)
        self.ids = [i.encode() if isinstance(i, str) else bytes(i) for i in ids]
        m = table_size
        if m is None:
            m = 65537
            if m <= 100 * n:
                m = 100 * n + 1
                while not is_prime(m):
                    m += 1
        self.m = m
        self.balance_factor, self.active = balance_factor, active
        offset = [xxh64(i, MAGLEV_SEED_OFFSET) % m for i in self.ids]
        skip = [xxh64(i, MAGLEV_SEED_SKIP) % (m - 1) + 1 for i in self.ids]
        nxt, credit, maxw = [0] * n, [0] * n, max(self.weights)
        table = [-1] * m
        filled = 0
        while filled < m:
            for i in range(n):
                credit[i] += self.weights[i]
                if credit[i] < maxw:
                    continue
                credit[i] -= maxw
                while table[(offset[i] + nxt[i] * skip[i]) % m] >= 0:
                    nxt[i] += 1
                table[(offset[i] + nxt[i] * skip[i]) % m] = i
                nxt[i] += 1
                filled += 1
                if filled == m:
                    break
        self.table = table

    def table_slots(self) -> list[int]:
        return [self.slots[i] for i in self.table]

    def pick(self, key: int = 0, tried: Iterable[int] = ()) -> int:
        tried = set(tried)
        usable = [i for i, s in enumerate(self.slots) if self.health.is_up(s) and s not in tried]
        if not usable:
            return -1
        bounded = self.balance_factor > 0
        if bounded:
            total = sum(self.active(self.slots[i]) for i in usable)
            wup = sum(self.weights[i] for i in usable)
        fallback = -1
        pos = key % self.m
        for _ in range(self.m):
            i = self.table[pos]
            s = self.slots[i]
            if self.health.is_up(s) and s not in tried:
                if not bounded:
                    return s
                if fallback < 0:
                    fallback = s
                if (self.active(s) + 1) * wup * 100 <= self.balance_factor * (total + 1) * self.weights[i]:
                    return s
            pos = (pos + 1) % self.m
        return fallback
