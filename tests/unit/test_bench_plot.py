"""bench/plot.py: the committed charts are embedded in bench/README.md and drawn from its table;
a results file in bench/e2e.py's format plots into three PNGs."""
import importlib.util
import json
import os
import re
import struct

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
    assert linked == on_disk == {"charts/e2e-loads.png", "charts/e2e-per-core.png", "charts/e2e-p99.png"}
    for name in on_disk:
        w, h = _png_size(os.path.join(BENCH, name))
        assert w >= 800 and h >= 300 and os.path.getsize(os.path.join(BENCH, name)) < 300_000


def test_the_charts_data_is_the_readme_table():
    with open(os.path.join(BENCH, "README.md")) as f:
        lines = f.read().splitlines()
    # the charted table: the one whose columns start with "direct" (the README has others)
    start = next(i for i, line in enumerate(lines) if line.startswith("| load | direct |"))
    table = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        table.append(line)
    assert [row.split("|")[1].split()[0] for row in table] == [
        "keepalive", "close", "bulk_up", "bulk_down"]
    with open(os.path.join(BENCH, "e2e-readme.json")) as f:
        med = json.load(f)["medians"]
    loads, peers, _ = _plot_module().load_results(os.path.join(BENCH, "e2e-readme.json"))
    assert loads == ["keepalive", "close", "bulk_up", "bulk_down"] and "fastlb" in peers
    for line in table:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        for peer, cell in zip(peers, cells[1:], strict=False):
            figure = float(cell.split(" ")[0].rstrip(",").replace(",", ""))
            assert med[f"{cells[0].split()[0]}/{peer}"]["value"] == figure


def test_plot_writes_three_charts(tmp_path):
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
