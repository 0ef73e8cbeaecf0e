"""The server's session hooks and callbacks on memory transports: one session_up when a
session gets its address, one end with its bytes, a takeover's old session included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.task import Clock

from cellvpn.hooks import HookRunner
from tests.server.test_session import Client, ipv4, make_server
from tests.test_hooks import FakeSpawner


def hooked(tmp_path: Path) -> tuple[Any, Any, FakeSpawner]:
    script = tmp_path / "session.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    server, clock, _ = make_server(
        tmp_path, **{"srv_vpn.session_up": str(script), "srv_vpn.session_down": str(script)}
    )
    spawner = FakeSpawner()
    server.hooks = HookRunner(spawner, Clock(), timeout=10, max_running=8, max_queued=4)
    return server, clock, spawner


def test_session_up_and_end_with_the_sessions_facts(tmp_path: Path) -> None:
    server, clock, spawner = hooked(tmp_path)
    ups: list[dict[str, Any]] = []
    ends: list[dict[str, Any]] = []
    server.on_session_up.append(lambda facts: 1 / 0)  # an application's bug breaks nothing
    server.on_session_up.append(ups.append)
    server.on_session_end.append(ends.append)
    c = Client(server, clock)
    c.request()
    assert spawner.spawned == []  # no address yet
    c.addr_request()
    sid = f"{c.session.session_id:#010x}"
    assert ups == [
        {
            "event": "session_up",
            "session_id": sid,
            "client_address": "198.18.9.2",
            "peer": "192.0.2.2:4000",
            "client": None,
        }
    ]
    env = spawner.spawned[0][3]
    assert env["CELLVPN_CLIENT_ADDRESS"] == "198.18.9.2" and env["CELLVPN_CLIENT"] == ""
    packet = ipv4("198.18.9.2", "198.19.0.10")
    c.send_ip(packet)
    c.lose()
    assert ends == [
        {
            "event": "session_down",
            "session_id": sid,
            "client_address": "198.18.9.2",
            "peer": "192.0.2.2:4000",
            "client": None,
            "bytes_in": len(packet),
            "bytes_out": 0,
        }
    ]
    assert spawner.spawned[1][3]["CELLVPN_BYTES_IN"] == str(len(packet))


def test_a_session_without_an_address_runs_no_hook(tmp_path: Path) -> None:
    server, clock, spawner = hooked(tmp_path)
    c = Client(server, clock)
    c.request()
    c.lose()
    assert spawner.spawned == []


def test_a_taken_over_session_still_ends_with_its_address(tmp_path: Path) -> None:
    server, clock, spawner = hooked(tmp_path)
    old = Client(server, clock)
    token = old.events[0].welcome.resume_token
    old.request()
    old.addr_request()
    new = Client(server, clock, token=token)
    new.request()
    new.addr_request()
    old.pump()
    old.lose()
    events = [(s[3]["CELLVPN_EVENT"], s[3]["CELLVPN_CLIENT_ADDRESS"]) for s in spawner.spawned]
    assert events == [
        ("session_up", "198.18.9.2"),
        ("session_up", "198.18.9.2"),
        ("session_down", "198.18.9.2"),
    ]
    assert (
        spawner.spawned[2][3]["CELLVPN_SESSION_ID"] == spawner.spawned[0][3]["CELLVPN_SESSION_ID"]
    )


def test_a_flood_of_sessions_runs_at_most_eight_hooks_and_drops_the_overflow(
    tmp_path: Path,
) -> None:
    server, clock, spawner = hooked(tmp_path)
    for _ in range(20):
        c = Client(server, clock)
        c.request()
        c.addr_request()
    assert len(spawner.spawned) == 8
    assert server.hooks.describe()["queued"] == 4 and server.hooks.dropped == 8
