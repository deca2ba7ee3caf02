"""bench/plot.py: the committed charts are embedded in bench/README.md and drawn from the run its
tables come from (bench/e2e-readme.json); a results file in bench/e2e.py's format plots into
three PNGs, four with the syscall and RSS figures."""
import importlib.util
import json
import os
import re
import struct

import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bench")
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(BENCH, "plot.py")),
                                reason="needs the source checkout")


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def _plot_module():
    spec = importlib.util.spec_from_file_location("bench_plot", os.path.join(BENCH, "plot.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_embeds_every_committed_chart():
    with open(os.path.join(BENCH, "README.md")) as f:
        linked = set(re.findall(r"!\[[^\]]*\]\((charts/[^)]+\.png)\)", f.read()))
    on_disk = {f"charts/{n}" for n in os.listdir(os.path.join(BENCH, "charts"))}
    assert linked == on_disk == {"charts/e2e-loads.png", "charts/e2e-per-core.png", "charts/e2e-p99.png",
                                 "charts/e2e-cost.png"}
    for name in on_disk:
        w, h = _png_size(os.path.join(BENCH, name))
        assert w >= 800 and h >= 300 and os.path.getsize(os.path.join(BENCH, name)) < 300_000


def test_the_charts_data_is_the_readme_table():
    """bench/README.md's cost tables are, verbatim, the tables of the run the charts plot."""
    spec = importlib.util.spec_from_file_location("bench_e2e_tables", os.path.join(BENCH, "e2e.py"))
    e2e = importlib.util.module_from_spec(spec)
    sys.modules["bench_e2e_tables"] = e2e           # dataclasses look their module up
    try:
        spec.loader.exec_module(e2e)
        with open(os.path.join(BENCH, "e2e-readme.json")) as f:
            data = json.load(f)
        tables = e2e.tables_from_json(data)
    finally:
        sys.modules.pop("bench_e2e_tables", None)
    with open(os.path.join(BENCH, "README.md")) as f:
        readme = f.read()
    assert tables in readme
    loads, peers, _ = _plot_module().load_results(os.path.join(BENCH, "e2e-readme.json"))
    assert loads == ["keepalive", "close", "bulk_up", "bulk_down", "mixed"]
    assert {"fastlb", "fastlb-2w", "haproxy", "haproxy-splice-auto", "nginx"} <= set(peers)
    assert data["syscalls"] and data["rss"]


def test_plot_writes_the_charts(tmp_path):
    pytest.importorskip("matplotlib", reason="the bench extra: pip install -e '.[bench]'")
    medians = {}
    for load, scale in (("keepalive", 1e5), ("close", 3e4), ("bulk_up", 17), ("bulk_down", 17)):
        for i, peer in enumerate(("direct", "haproxy", "fastlb", "asyncio-protocol")):
            medians[f"{load}/{peer}"] = {
                "value": scale * (1.5 - 0.2 * i), "errors": 0,
                "p99_ms": (0.5 + i) if load in ("keepalive", "close") else None,
                "cpu_pct": None if peer == "direct" else 80.0 + i}
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps({"runs": 1, "duration": 1, "connections": 64,
                                "medians": medians, "samples": {}}))
    assert _plot_module().main([str(path), "--out", str(tmp_path / "charts")]) == 0
    names = sorted(os.listdir(tmp_path / "charts"))
    assert names == ["e2e-loads.png", "e2e-p99.png", "e2e-per-core.png"]
    for n in names:
        assert _png_size(tmp_path / "charts" / n)[0] >= 800
    # with the strace rounds and the RSS round: the cost chart too
    data = json.loads(path.read_text())
    data["per"] = {"close": "connection"}
    data["syscalls"] = {f"close/{p}": {"calls": {"total": 2000 + 100 * i}, "count": 100, "value": 1}
                        for i, p in enumerate(("haproxy", "fastlb"))}
    data["rss"] = {"haproxy": {"per_conn_kib": 3.3}, "fastlb": {"per_conn_kib": 0.4}}
    path.write_text(json.dumps(data))
    assert _plot_module().main([str(path), "--out", str(tmp_path / "charts2")]) == 0
    assert "e2e-cost.png" in os.listdir(tmp_path / "charts2")
