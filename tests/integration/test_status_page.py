"""The status page in headless Chromium against a running fastlb: the DOM shows every backend,
then a killed backend going DOWN with its reason; a screenshot is taken and checked not blank.

Chromium is Debian's `chromium` package (.ci/run installs it). Without it the test skips, except
where FASTLB_REQUIRE_CHROMIUM=1 (CI), where it fails."""
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import zlib

import pytest

from helpers import free_port, service, start_backend, start_fastlb

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM and os.environ.get("FASTLB_REQUIRE_CHROMIUM") != "1":
    pytest.skip("needs chromium (apt-get install chromium)", allow_module_level=True)


def chromium(tmp_path, url, *args):
    assert CHROMIUM, "chromium is required here (FASTLB_REQUIRE_CHROMIUM=1): apt-get install chromium"
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,640",
                          "--virtual-time-budget=3000", *args, url],
                         capture_output=True, text=True, timeout=90, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def rows(dom):
    """{address: status} from the rendered table rows."""
    return dict(re.findall(r'<tr data-service="web" data-address="([^"]+)" data-status="([A-Z]+)"', dom))


def png_pixels(path):
    """(width, height, rows of RGB(A) bytes) of an 8-bit RGB/RGBA PNG, unfiltered."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6)
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride, prev, out = zlib.decompress(idat), width * bpp, bytearray(width * bpp), []
    for y in range(height):
        ftype, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 255
            elif ftype == 2:
                line[i] = (line[i] + b) & 255
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out.append(bytes(line))
        prev = line
    return width, height, out, bpp


def test_status_page_shows_a_backend_going_down(procs, tmp_path):
    a, b = (start_backend(procs, "announce", name=n) for n in "ab")
    mport = free_port()
    health = '{ interval = "200ms", timeout = "200ms", rise = 1, fall = 1 }'
    lb, (port,) = start_fastlb(procs, f'[global]\nmetrics = "127.0.0.1:{mport}"\n'
                               + service("web", [(a[1], 2), (b[1], 1)], health=health))
    for _ in range(6):                                          # some traffic for the counters
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.recv(100)
    url = f"http://127.0.0.1:{mport}/"
    dom = chromium(tmp_path, url, "--dump-dom")
    addr_a, addr_b = f"127.0.0.1:{a[1]}", f"127.0.0.1:{b[1]}"
    assert rows(dom) == {addr_a: "UP", addr_b: "UP"}, dom[-3000:]
    assert 'id="backends-up">2 / 2<' in dom and "<script src" not in dom
    assert "http://" not in dom.split("<script>")[0].replace(url, "")
    b[0].signal(signal.SIGKILL)
    lb.wait_line(rf"web/{re.escape(addr_b)} DOWN: 1 check failed")
    dom = chromium(tmp_path, url, "--dump-dom")
    assert rows(dom) == {addr_a: "UP", addr_b: "DOWN"}, dom[-3000:]
    assert "1 check failed (Connection refused)" in dom and 'id="backends-up">1 / 2<' in dom
    shot = tmp_path / "status.png"
    chromium(tmp_path, url, f"--screenshot={shot}")
    width, height, pixels, bpp = png_pixels(shot)
    assert (width, height) == (1400, 640)
    colors = {row[i:i + 3] for row in pixels[::4] for i in range(0, len(row), bpp * 4)}
    assert len(colors) > 20, "the screenshot is blank"
    # the page's own colours are there: the dark header, the green UP and red DOWN badges

    def near(rgb):
        return any(sum(abs(x - y) for x, y in zip(c, rgb, strict=False)) < 40 for c in colors)
    assert near((0x18, 0x20, 0x2C)) and near((0x1F, 0x9D, 0x55)) and near((0xD6, 0x45, 0x45))
    if os.environ.get("FASTLB_SCREENSHOT"):
        shutil.copy(shot, os.environ["FASTLB_SCREENSHOT"])
    lb.signal(signal.SIGTERM)
    assert lb.wait() == 0
