"""``vpn_client check result``: which servers are listed, their state, and the file kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor

from cellvpn.client.checkbook import CheckBook, availability, configured_servers, result_rows
from cellvpn.config import load_client_config
from cellvpn.control.text import check_results


def test_the_state_of_a_server_is_its_last_check() -> None:
    for entry, state in (
        (None, "Unknown"),
        ({"code": 0}, "Available"),
        ({"code": -2}, "Not available"),
        ({"code": -3}, "Not available"),
    ):
        assert availability(entry) == state


def test_the_configured_server_comes_first_then_the_others_newest_first(tmp_path: Path) -> None:
    config = load_client_config(None, {"client.server": "[2001:db8::1]:8089"})
    assert configured_servers(config) == ["[2001:db8::1]:8089"]
    assert configured_servers(load_client_config(None)) == []
    checked = {
        "192.0.2.9:1": {"checked_at": 10.0, "code": -2, "reason": "refused"},
        "192.0.2.8:1": {"checked_at": 20.0, "code": 0, "rtt_avg_ms": 1.5},
    }
    rows = result_rows(["[2001:db8::1]:8089"], checked)
    assert [(r["server"], r["state"], r["configured"]) for r in rows] == [
        ("[2001:db8::1]:8089", "Unknown", True),
        ("192.0.2.8:1", "Available", False),
        ("192.0.2.9:1", "Not available", False),
    ]
    assert check_results(rows).splitlines() == [
        "[2001:db8::1]:8089: State Unknown",
        "192.0.2.8:1: State Available, checked 1970-01-01 00:00:20 UTC, rtt 1.50 ms, "
        "up 0 bytes/s (0.0 Mbit/s), down 0 bytes/s (0.0 Mbit/s) (not configured)",
        "192.0.2.9:1: State Not available, checked 1970-01-01 00:00:10 UTC: refused "
        "(not configured)",
    ]
    assert check_results([]) == "No servers configured or checked"


@pytest_twisted.ensureDeferred
async def test_a_check_is_kept_in_the_state_folder_and_read_back(tmp_path: Path) -> None:
    book = CheckBook(tmp_path / "state", reactor)
    assert await book.results() == {}
    await book.record("192.0.2.1:8089", {"code": 0, "rtt_avg_ms": 0.5, "extra": 1}, 100.0)
    await book.record("192.0.2.1:8090", {"code": -2, "reason": "refused"}, 101.0)
    saved = json.loads((tmp_path / "state" / "checks.json").read_text())["servers"]
    assert saved["192.0.2.1:8089"]["rtt_avg_ms"] == 0.5 and "extra" not in saved["192.0.2.1:8089"]
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["checks.json"]  # no temp file
    again = await CheckBook(tmp_path / "state", reactor).results()
    assert {s: (e["code"], e["checked_at"]) for s, e in again.items()} == {
        "192.0.2.1:8089": (0, 100.0),
        "192.0.2.1:8090": (-2, 101.0),
    }
    (tmp_path / "state" / "checks.json").write_text("not json")
    assert await CheckBook(tmp_path / "state", reactor).results() == {}
