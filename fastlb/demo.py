"""``fastlb demo``: fastlb's main job on an embedded default, with nothing else installed.

Starts three local backends that announce their name (weights 3:2:1), runs ``fastlb run`` in
front of them with one service per policy, drives a short load through each, prints who served
what, then kills one backend and shows traffic moving to the others with no client error (and,
for maglev, every client of a surviving backend staying where it was). Everything runs on
127.0.0.1 and every process started is stopped by its PID.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from importlib import resources
from typing import cast

from fastlb import spawn
from fastlb._core import POLICIES   # the core's one table of policy names

NAMES = ("alpha", "bravo", "charlie")
WEIGHTS = (3, 2, 1)
CLIENT_IPS = [f"127.0.0.{i}" for i in range(2, 62)]   # 60 distinct clients for maglev


def sample_config() -> str:
    """The sample config shipped in the package (fastlb/sample.toml): `fastlb demo --print-config`."""
    return resources.files("fastlb").joinpath("sample.toml").read_text()


def print_config() -> int:
    sys.stdout.write(sample_config())
    return 0


def _start(args: list[str]) -> subprocess.Popen[str]:
    """Start ``python -m args...`` running this same fastlb package (see fastlb.spawn)."""
    return subprocess.Popen(spawn.command(*args), env=spawn.environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(proc: subprocess.Popen[str], pattern: str,
              timeout: float = 10.0) -> tuple[re.Match[str], list[str]]:
    deadline, seen = time.monotonic() + timeout, []
    rx = re.compile(pattern)
    assert proc.stdout is not None      # _start pipes it
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line.rstrip())
        if m := rx.search(line):
            return m, seen
    argv = cast(list[str], proc.args)   # _start's spawn.command list
    raise RuntimeError(f"{argv[:4]} did not say {pattern!r}:\n" + "\n".join(seen))


async def _one(port: int, source_ip: str | None) -> str:
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(source_ip, 0) if source_ip else None)
    try:
        name = (await asyncio.wait_for(r.readline(), 5)).decode().strip()
        w.write(b"ping")
        await w.drain()
        if await asyncio.wait_for(r.readexactly(4), 5) != b"ping":
            raise RuntimeError("echo mismatch")
        return name
    finally:
        w.close()


async def _load(port: int, count: int, maglev: bool) -> tuple[dict[str, int], int, dict[str, str]]:
    counts, errors, by_client = {n: 0 for n in NAMES}, 0, {}
    sem = asyncio.Semaphore(20)

    async def run(i: int) -> None:
        nonlocal errors
        ip = CLIENT_IPS[i % len(CLIENT_IPS)] if maglev else None
        async with sem:
            try:
                name = await _one(port, ip)
            except (OSError, RuntimeError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                errors += 1
                return
        counts[name] += 1
        if ip:
            by_client[ip] = name
    await asyncio.gather(*(run(i) for i in range(count)))
    return counts, errors, by_client


def _table(title: str, rows: list[tuple[str, dict[str, int], int]]) -> None:
    print(f"\n{title}")
    print(f"  {'policy':<12}"
          + "".join(f"{n + ' (w' + str(w) + ')':>14}" for n, w in zip(NAMES, WEIGHTS, strict=True))
          + f"{'errors':>8}")
    for policy, counts, errors in rows:
        total = sum(counts.values()) or 1
        print(f"  {policy:<12}" + "".join(f"{counts[n]:>6} ({100 * counts[n] / total:3.0f}%)" for n in NAMES)
              + f"{errors:>8}")


def main(connections: int = 300) -> int:
    t0 = time.monotonic()
    procs: list[subprocess.Popen[str]] = []
    cfg_path = None
    try:
        backends = {}
        for name in NAMES:
            p = _start(["fastlb.devservers", "announce", "--name", name])
            procs.append(p)
            backends[name] = (p, int(_wait_for(p, r"READY (\d+)")[0].group(1)))
        print("fastlb demo: three backends on 127.0.0.1: "
              + ", ".join(f"{n} :{backends[n][1]} weight {w}" for n, w in zip(NAMES, WEIGHTS, strict=True)))
        blocks = []
        for policy in POLICIES:
            bs = ", ".join(f'{{ address = "127.0.0.1:{backends[n][1]}", weight = {w} }}'
                           for n, w in zip(NAMES, WEIGHTS, strict=True))
            blocks.append(f'[[service]]\nname = "{policy}"\nlisten = ["127.0.0.1:0"]\n'
                          f'policy = "{policy}"\nretries = 2\ntimeouts = {{ connect = "1s" }}\n'
                          f'backends = [ {bs} ]\n')
        fd, cfg_path = tempfile.mkstemp(prefix="fastlb-demo-", suffix=".toml")
        with os.fdopen(fd, "w") as f:
            f.write("[global]\ngrace = \"2s\"\n\n" + "\n".join(blocks))
        lb = _start(["fastlb", "run", "-c", cfg_path])
        procs.append(lb)
        _, lines = _wait_for(lb, r"fastlb ready")
        ports = {m.group(1): int(m.group(2)) for line in lines
                 if (m := re.search(r"service (\S+): listening on \S+:(\d+)", line))}
        print(f"fastlb (pid {lb.pid}) balancing one service per policy: "
              + ", ".join(f"{p} :{ports[p]}" for p in POLICIES))

        rows, before = [], {}
        for policy in POLICIES:
            counts, errors, by_client = asyncio.run(_load(ports[policy], connections, policy == "maglev"))
            rows.append((policy, counts, errors))
            before[policy] = by_client
        _table(f"{connections} connections per policy, all backends up:", rows)

        victim, vport = NAMES[2], backends[NAMES[2]][1]
        backends[victim][0].send_signal(signal.SIGKILL)
        backends[victim][0].wait(5)
        print(f"\nkilled backend {victim} (:{vport}); fastlb retries its connects on the others")
        rows, moved_ok = [], True
        for policy in POLICIES:
            counts, errors, by_client = asyncio.run(_load(ports[policy], connections, policy == "maglev"))
            rows.append((policy, counts, errors))
            if policy == "maglev":
                kept = sum(1 for ip, n in before["maglev"].items() if n != victim and by_client.get(ip) == n)
                stayed = sum(1 for n in before["maglev"].values() if n != victim)
                moved = sum(1 for n in before["maglev"].values() if n == victim)
                moved_ok = kept == stayed
        _table(f"{connections} connections per policy, {victim} dead:", rows)
        print(f"\nmaglev affinity: {kept} of {stayed} clients of alpha/bravo kept their backend; "
              f"the {moved} clients of {victim} moved")
        errors = sum(e for _, _, e in rows)
        lb.send_signal(signal.SIGTERM)
        code = lb.wait(10)
        print(f"\nfastlb stopped (exit {code}); demo took {time.monotonic() - t0:.1f}s; "
              f"{errors} client errors after the kill")
        return 0 if code == 0 and errors == 0 and moved_ok else 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(5)
        if cfg_path:
            os.unlink(cfg_path)


if __name__ == "__main__":
    sys.exit(main())
