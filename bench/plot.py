"""Charts of the end-to-end benchmark: fastlb beside HAProxy, nginx and the naive proxies.

    python3 bench/plot.py [JSON] [--out bench/charts]

Reads the JSON ``bench/e2e.py`` writes (default ``bench/results/e2e.json``; the committed
``bench/e2e-readme.json`` is the run bench/README.md's tables come from) and draws into
``--out``:

- ``e2e-loads.png``: per load, each peer's figure (req/s, conn/s, Gbit/s) with its ratio to
  HAProxy's;
- ``e2e-per-core.png``: per load, the figure per core of CPU the balancer used (figure divided
  by its CPU time as a fraction of one core): how much work each proxy gets from a core;
- ``e2e-p99.png``: the p99 latency of the loads wrk measured (keep-alive, new connections, and
  keep-alive under a bulk transfer);
- ``e2e-cost.png`` (when the run had strace rounds or the idle RSS round): syscalls per
  request / connection / MB, and KiB of RSS per idle connection (lower is better).

Needs matplotlib (``pip install -e '.[bench]'``); nothing else of fastlb is imported.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
UNITS = {"keepalive": "requests/s", "close": "new connections/s", "bulk_up": "Gbit/s",
         "bulk_down": "Gbit/s", "mixed": "requests/s"}
TITLES = {"keepalive": "keep-alive requests", "close": "a new connection per request",
          "bulk_up": "bulk, client to server", "bulk_down": "bulk, server to client",
          "mixed": "keep-alive during a bulk transfer"}
# fastlb stands out; the reference (HAProxy) is dark; the others are muted.
COLORS = {"fastlb": "#1f6fd1", "fastlb-2w": "#6ea8ec", "fastlb-base": "#9bbce4",
          "haproxy": "#3b3f46", "haproxy-splice-auto": "#6b707a", "haproxy-splice-on": "#9aa0a9",
          "nginx": "#3c9a5f", "asyncio-streams": "#e0a458",
          "asyncio-protocol": "#d17a22", "direct": "#c9ced6"}


def load_results(path: str) -> tuple[list[str], list[str], dict[tuple[str, str], dict]]:
    """(loads, peers, medians by (load, peer)) in the order e2e.py measured them."""
    with open(path) as f:
        data = json.load(f)
    for name, unit in data.get("units", {}).items():          # loads others registered
        UNITS.setdefault(name, {"req/s": "requests/s", "conn/s": "new connections/s"}.get(unit, unit))
    for name, title in data.get("titles", {}).items():
        TITLES.setdefault(name, title)
    loads: list[str] = []
    peers: list[str] = []
    med = {}
    for key, m in data["medians"].items():
        load, peer = key.split("/", 1)
        if load not in loads:
            loads.append(load)
        if peer not in peers:
            peers.append(peer)
        med[(load, peer)] = m
    return loads, peers, med


def _fmt(value: float, unit: str) -> str:
    if unit.startswith("Gbit/s"):
        return f"{value:.1f}"
    if unit.endswith("ms") or value < 1000:
        return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"
    return f"{value / 1000:.0f}k"


def _bars(ax, peers, values, unit, ratios=None, title=""):
    xs = range(len(peers))
    bars = ax.bar(xs, values, color=[COLORS.get(p, "#888") for p in peers], width=0.72,
                  edgecolor="white")
    for i, (bar, value) in enumerate(zip(bars, values, strict=False)):
        label = _fmt(value, unit)
        if ratios and ratios[i] is not None:
            label += f"\n{ratios[i]:.2f}x"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                    fontsize=8, color="#333")
    ax.set_xticks(list(xs), peers, rotation=30, ha="right", fontsize=8.5)
    ax.set_ylabel(unit, fontsize=9)
    ax.set_title(title, fontsize=10.5, loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", color="#e6e8eb", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.set_ylim(0, max(values) * 1.22)
    ax.tick_params(axis="y", labelsize=8)
    if not unit.startswith("Gbit/s") and not unit.endswith("ms") and max(values) >= 1000:
        from matplotlib.ticker import FuncFormatter
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:.0f}k" if v else "0"))


def plot(path: str, out: str) -> list[str]:
    """Draw the charts of one results file; return the PNG paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads, peers, med = load_results(path)
    os.makedirs(out, exist_ok=True)
    written = []
    root = os.path.dirname(HERE)
    note = os.path.relpath(path, root) if os.path.abspath(path).startswith(root) else os.path.basename(path)

    rows = (len(loads) + 1) // 2

    # 1. per load: the figure and its ratio to HAProxy
    fig, axes = _grid(plt, len(loads))
    for ax, load in zip(axes.flat, loads, strict=False):
        ps = [p for p in peers if (load, p) in med]
        base = med.get((load, "haproxy"), {}).get("value")
        values = [med[(load, p)]["value"] for p in ps]
        ratios = [v / base if base and p != "haproxy" else None for p, v in zip(ps, values, strict=False)]
        _bars(ax, ps, values, UNITS.get(load, ""), ratios, TITLES.get(load, load))
    fig.suptitle("End to end, one core for the balancer: figure and ratio to HAProxy "
                 "(higher is better)", fontsize=12, x=0.01, ha="left")
    fig.text(0.01, 0.005, f"medians, {note}; 'direct' is the load without a balancer",
             fontsize=7.5, color="#666")
    fig.tight_layout(rect=(0, 0.02, 1, 1 - 0.04 / rows))
    written.append(_save(fig, out, "e2e-loads.png"))

    # 2. per proxy core: the figure per core of CPU the balancer used
    fig, axes = _grid(plt, len(loads))
    for ax, load in zip(axes.flat, loads, strict=False):
        ps = [p for p in peers if (load, p) in med and med[(load, p)].get("cpu_pct")]
        values = [med[(load, p)]["value"] / (med[(load, p)]["cpu_pct"] / 100) for p in ps]
        base = dict(zip(ps, values, strict=False)).get("haproxy")
        ratios = [v / base if base and p != "haproxy" else None for p, v in zip(ps, values, strict=False)]
        _bars(ax, ps, values, UNITS.get(load, "") + " per core", ratios, TITLES.get(load, load))
    fig.suptitle("Per proxy core: figure divided by the balancer's CPU time (fraction of one "
                 "core); ratio to HAProxy", fontsize=12, x=0.01, ha="left")
    fig.text(0.01, 0.005, f"medians, {note}; CPU from /proc/PID/stat over all the balancer's "
             "processes", fontsize=7.5, color="#666")
    fig.tight_layout(rect=(0, 0.02, 1, 1 - 0.04 / rows))
    written.append(_save(fig, out, "e2e-per-core.png"))

    # 3. latency: p99 where wrk measured it
    lat = [load for load in loads if any(med.get((load, p), {}).get("p99_ms") for p in peers)]
    if lat:
        fig, axes = plt.subplots(1, len(lat), figsize=(max(11, 5.5 * len(lat)), 3.8), dpi=100,
                                 squeeze=False)
        for ax, load in zip(axes.flat, lat, strict=False):
            ps = [p for p in peers if (load, p) in med and med[(load, p)].get("p99_ms")]
            values = [med[(load, p)]["p99_ms"] for p in ps]
            base = dict(zip(ps, values, strict=False)).get("haproxy")
            ratios = [v / base if base and p != "haproxy" else None for p, v in zip(ps, values, strict=False)]
            _bars(ax, ps, values, "p99 ms", ratios, TITLES.get(load, load))
        fig.suptitle("p99 latency (lower is better)", fontsize=12, x=0.01, ha="left")
        fig.tight_layout(rect=(0, 0, 1, 0.93))
        written.append(_save(fig, out, "e2e-p99.png"))

    # 4. cost per unit of work: syscalls (strace rounds) and RSS per idle connection
    with open(path) as f:
        data = json.load(f)
    panels = []
    for key, s in data.get("syscalls", {}).items():
        load, peer = key.split("/", 1)
        if s.get("count"):
            per = data.get("per", {}).get(load, "unit")
            title = f"syscalls per {per}, {TITLES.get(load, load)}"
            if not panels or panels[-1][0] != title:
                panels.append((title, f"syscalls per {per}", {}))
            panels[-1][2][peer] = s["calls"]["total"] / s["count"]
    rss = {p: r["per_conn_kib"] for p, r in data.get("rss", {}).items()}
    if rss:
        panels.append(("RSS per idle connection (after 4 KiB each way)", "KiB", rss))
    if panels:
        fig, axes = _grid(plt, len(panels))
        for ax, (title, unit, values) in zip(axes.flat, panels, strict=False):
            ps = [p for p in peers if p in values] + [p for p in values if p not in peers]
            base = values.get("haproxy")
            ratios = [values[p] / base if base and p != "haproxy" else None for p in ps]
            _bars(ax, ps, [max(values[p], 0.0) or 1e-9 for p in ps], unit, ratios, title)
        fig.suptitle("Cost per unit of work (lower is better); ratio to HAProxy", fontsize=12,
                     x=0.01, ha="left")
        fig.text(0.01, 0.005, f"{note}; strace -c -f over an extra round of each load; RSS: "
                 "VmRSS growth of the proxy's processes / idle connections", fontsize=7.5,
                 color="#666")
        fig.tight_layout(rect=(0, 0.02, 1, 1 - 0.04 / ((len(panels) + 1) // 2)))
        written.append(_save(fig, out, "e2e-cost.png"))
    return written


def _grid(plt, n: int):
    rows = max(1, (n + 1) // 2)
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.6 * rows), dpi=100, squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    return fig, axes


def _save(fig, out: str, name: str) -> str:
    import matplotlib.pyplot as plt
    path = os.path.join(out, name)
    fig.savefig(path, dpi=100, facecolor="white")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", nargs="?", default=os.path.join(HERE, "results", "e2e.json"))
    ap.add_argument("--out", default=os.path.join(HERE, "charts"))
    a = ap.parse_args(argv)
    if not os.path.exists(a.json):
        print(f"bench/plot.py: {a.json} does not exist: run bench/e2e.py first, or plot "
              f"bench/e2e-readme.json", file=sys.stderr)
        return 2
    for path in plot(a.json, a.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
