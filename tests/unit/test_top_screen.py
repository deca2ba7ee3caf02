"""fastlb top's screen, rendered from stats with no terminal."""
from fastlb.top import render


def _stats(total_a, bytes_a, health_b="up", state_b="ready"):
    def b(address, total, nbytes, health, state):
        return {"address": address, "weight": 2, "state": state, "health": health, "active": 1,
                "total": total, "bytes_in": nbytes, "bytes_out": 2 * nbytes,
                "connect_failures": 0, "check_failures": 0, "health_reason": "2 checks passed"}
    return [{"service": "web", "backends": [b("10.0.0.1:80", total_a, bytes_a, "up", "ready"),
                                             b("10.0.0.2:80", 0, 0, health_b, state_b)]}]


def test_rates_from_two_polls_statuses_and_events():
    first = _stats(100, 1000)
    prev = {("web", b["address"]): b for b in first[0]["backends"]}
    lines = render(_stats(150, 1000 + 2048 * 2, "down"), prev, 2.0,
                   [{"op": "health", "service": "web", "address": "10.0.0.2:80", "health": "down",
                     "reason": "3 checks failed", "_at": 0}], 160, 30, color=False)
    text = "\n".join(lines)
    row_a = next(line for line in lines if line.startswith("10.0.0.1:80"))
    assert row_a.split()[1:7] == ["UP", "2", "1", "25.0", "2.0K", "4.0K"]    # 50 conns / 2 s
    assert next(line for line in lines if line.startswith("10.0.0.2:80")).split()[1] == "DOWN"
    assert "backends up 1/2" in lines[0] and "web/10.0.0.2:80 DOWN: 3 checks failed" in text
    assert all(len(line) <= 160 for line in lines) and len(lines) <= 30


def test_first_poll_has_no_rates_and_a_small_screen_is_cut():
    lines = render(_stats(1, 1, state_b="maint"), None, 0.0, [], 40, 5, color=False)
    assert len(lines) == 5 and all(len(line) <= 40 for line in lines)
    lines = render(_stats(1, 1, state_b="maint"), None, 0.0, [], 200, 40, color=False)
    assert next(line for line in lines if line.startswith("10.0.0.2:80")).split()[1] == "MAINT"
    assert "(none yet)" in lines


def test_colour_codes_only_around_the_status():
    lines = render(_stats(1, 1), None, 0.0, [], 200, 40, color=True)
    row = next(line for line in lines if line.startswith("10.0.0.1:80"))
    assert "\x1b[32mUP    \x1b[0m" in row
