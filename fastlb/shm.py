"""The shared-memory layout: health bitmap + counters + gauges over one memfd mapping, and slots.

Owner: the layout (``LAYOUT_VERSION``, ``layout_size``, ``views``: the same in every process)
and, in the supervisor, the slot table (``SharedState``). Workers import this module to map
the memory; it imports nothing of the supervisor. Counter helpers that zero fields live here,
each in one function, so the core's ``Counters.zero`` can replace their loops in one place.
"""
from __future__ import annotations

import mmap
import os
from typing import Callable

from fastlb import _core, cpus
from fastlb.errors import RegistryError

# Bump when the mapping's layout (bitmap, counter fields, block size) changes: a worker of
# another layout is refused (see fastlb.plan, hello).
LAYOUT_VERSION = 4          # 2: Gauges; 3: [access] the per-source table at the end
                            # of the mapping; 4: [obs] the connection log after the gauges

# [obs] Test hook: the records each connection-log ring holds (a power of two; default
# _core.CL_DEFAULT_CAPACITY). Read by the supervisor and, through the environment it passes
# on, by its workers, so both compute the same layout. Tests set it tiny to fill a ring.
CONNLOG_RING_ENV = "FASTLB_TEST_CONNLOG_RING"


def connlog_capacity() -> int:
    return int(os.environ.get(CONNLOG_RING_ENV) or str(_core.CL_DEFAULT_CAPACITY))


def blocks_for(workers: int) -> int:
    """Counter blocks: one in process; with workers 2 x max(N, CPUs), so a rolling restart
    can run old and new workers side by side and a reload can add workers."""
    return 1 if workers == 1 else 2 * max(workers, cpus.usable())


def layout_size(max_backends: int, nblocks: int) -> int:
    return (_core.HealthBitmap.size_for(max_backends) + _core.Counters.size_for(max_backends, nblocks)
            + _core.Gauges.size_for(max_backends + 1, nblocks)
            + _core.ConnLog.size_for(max_backends + 1, nblocks, connlog_capacity()))   # [obs]


Views = tuple[_core.HealthBitmap, _core.Counters, _core.Gauges]


def views(mapping: mmap.mmap, max_backends: int, nblocks: int, block: int = 0) -> Views:
    """The health bitmap, the counters and the gauges over the shared mapping (the same
    layout in every process). The gauges view mirrors its places in counter block ``block``
    (the worker's index; the supervisor's is 0), so a dead worker's can be reclaimed."""
    hsize = _core.HealthBitmap.size_for(max_backends)
    csize = _core.Counters.size_for(max_backends, nblocks)
    view = memoryview(mapping)
    return (_core.HealthBitmap(view[:hsize], max_backends),
            _core.Counters(view[hsize:hsize + csize], max_backends, nblocks),
            _core.Gauges(view[hsize + csize:hsize + csize + _core.Gauges.size_for(
                max_backends + 1, nblocks)], max_backends + 1, nblocks, block))


def connlog_view(mapping: mmap.mmap, max_backends: int, nblocks: int,
                 block: int = 0) -> _core.ConnLog:
    """[obs] The connection-log rings and histograms: the region after the gauges. A separate
    function so that views() keeps its three views for its callers. The view writes block
    ``block``'s ring and histograms (a worker's index); the supervisor drains every ring."""
    start = (_core.HealthBitmap.size_for(max_backends) + _core.Counters.size_for(max_backends, nblocks)
             + _core.Gauges.size_for(max_backends + 1, nblocks))
    return _core.ConnLog(memoryview(mapping)[start:], max_backends + 1, nblocks, block,
                         connlog_capacity(), int.from_bytes(os.urandom(8), "little"))


def source_table(mapping: mmap.mmap, max_backends: int, nblocks: int) -> _core.SourceTable:
    """[access] The balancer's one per-source table (core/srclimit.pxi): the region after
    everything of layout_size, to the end of the mapping (its size tells the entries, so a
    worker needs no argument for it). Keys are (service row, source): every service's
    per-source limits count in it, across all workers."""
    offset = layout_size(max_backends, nblocks)
    entries = (len(mapping) - offset) // 16
    return _core.SourceTable(memoryview(mapping)[offset:offset + 16 * entries], entries)


def zero_active(counters: _core.Counters, block: int, gauges: _core.Gauges | None = None) -> None:
    """A dead worker's connections are gone: clear its active counts (totals stay) and give
    back the places it held on the gauges (connections and queue places under the limits)."""
    counters.zero(block, fields=(_core.CTR_ACTIVE,))
    if gauges is not None:
        gauges.reclaim(block)


def zero_slot(counters: _core.Counters, slot: int, gauges: _core.Gauges | None = None,
              connlog: _core.ConnLog | None = None) -> None:
    """A freed slot starts from zero in every block (its totals are not the next backend's)."""
    for block in range(counters.nblocks):
        counters.zero(block, slot)
    if gauges is not None:
        gauges.zero(slot)
    if connlog is not None:                 # [obs] a service's histograms
        connlog.zero(slot)


# The slot-table key of a service's own row: no backend address is empty.
SERVICE_ROW = ""


class SharedState:
    """The shared-memory mapping and the slot table of backends and services.

    The mapping is a memfd, so worker processes started with exec map the same memory. A slot
    belongs to one (service, backend address), or to a service itself (its Gauges row: the
    key (service, SERVICE_ROW), which no backend address can be). A released slot is reused only once no
    connection uses it (its active count is back to zero) and every data path has
    acknowledged the snapshot generation that removed it: see reap().
    """

    def __init__(self, max_backends: int, nblocks: int = 1,
                 source_entries: int = _core.SRC_MIN_ENTRIES) -> None:
        self.max_backends = max_backends
        self.nblocks = nblocks
        self.size = layout_size(max_backends, nblocks) + _core.SourceTable.size_for(source_entries)
        self.fd = os.memfd_create("fastlb-shm", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.mapping = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED)
        self.health, self.counters, self.gauges = views(self.mapping, max_backends, nblocks)
        self.sources = source_table(self.mapping, max_backends, nblocks)      # [access]
        self.connlog = connlog_view(self.mapping, max_backends, nblocks)     # [obs]
        self.slots: dict[tuple[str, str], int] = {}   # (service, backend address) -> slot
        self._free = list(range(max_backends - 1, -1, -1))
        self._released: list[tuple[int, int]] = []     # (slot, generation that removed it)
        self.acked: Callable[[], int] = lambda: 1 << 62  # lowest generation every data path runs

    def slot_for(self, service: str, backend_id: str) -> int:
        key = (service, backend_id)
        if key not in self.slots:
            self.reap()
            if not self._free:
                raise RegistryError("full", f"all {self.max_backends} backend slots are in use")
            self.slots[key] = self._free.pop()
        return self.slots[key]

    def can_take(self, n: int) -> None:
        """Raise RegistryError("full") unless ``n`` new slots can be handed out now (the
        prepare step's check: slot_for then cannot fail)."""
        if n > len(self._free):
            self.reap()
        if n > len(self._free):
            raise RegistryError("full", f"{n} new backend slot(s) needed, {len(self._free)} free "
                                        f"of {self.max_backends}; nothing changed")

    def release(self, service: str, backend_id: str, generation: int) -> None:
        slot = self.slots.pop((service, backend_id), None)
        if slot is not None:
            self.health.mark_down(slot)
            self._released.append((slot, generation))

    def reap(self) -> None:
        """Free released slots no connection and no data path's snapshot uses any more."""
        busy, acked = [], self.acked()
        for slot, gen in self._released:
            if (self.counters.active(slot) or self.gauges.get(slot, _core.G_CUR)
                    or self.gauges.get(slot, _core.G_QUEUED) or gen > acked):
                busy.append((slot, gen))
                continue
            zero_slot(self.counters, slot, self.gauges, self.connlog)
            self._free.append(slot)
        self._released = busy
