"""How many CPUs this process may use: what ``workers = "auto"`` and the shared-memory layout
count, rather than every CPU of the host (a container or a systemd unit usually gets fewer).

Owner: reading the affinity mask and the cgroup v2 CPU quota. A cgroup v1 host has no
``cpu.max`` to read; there the affinity mask alone counts.
"""
from __future__ import annotations

import math
import os


def usable(*, affinity: set[int] | None = None, cgroup_root: str = "/sys/fs/cgroup",
                proc_cgroup: str = "/proc/self/cgroup") -> int:
    """The CPUs this process may really use: its affinity mask (taskset, cpusets), lowered by a
    cgroup v2 CPU quota (``cpu.max``, as set by ``docker --cpus`` or systemd's CPUQuota=) of its
    cgroup or any parent, rounded up. At least 1. The keyword arguments are for tests."""
    n = len(affinity if affinity is not None else os.sched_getaffinity(0)) or 1
    quota = _cgroup_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return n


def _cgroup_quota(root: str, proc_cgroup: str) -> float | None:
    """The tightest ``cpu.max`` quota (in CPUs) from our cgroup v2 up to the root, or None."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    # cgroup v2: the one line "0::/path"; a v1 or hybrid host has no cpu.max to read.
    path = next((ln[3:] for ln in lines if ln.startswith("0::")), None)
    if path is None:
        return None
    best = None
    parts = [p for p in path.strip("/").split("/") if p]
    for depth in range(len(parts), -1, -1):
        try:
            with open(os.path.join(root, *parts[:depth], "cpu.max")) as f:
                fields = f.read().split()
        except OSError:
            continue
        if len(fields) >= 2 and fields[0] != "max":
            try:
                q = int(fields[0]) / int(fields[1])
            except (ValueError, ZeroDivisionError):
                continue
            best = q if best is None else min(best, q)
    return best
