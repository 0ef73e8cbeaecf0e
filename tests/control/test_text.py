"""The node CLI's text, as the original prints it."""

from __future__ import annotations

from cellvpn.control.text import client_status, human_bytes, vpn_stat


def test_human_bytes_follows_the_original() -> None:
    """Bytes below 2048, then KiB/MiB/GiB/TiB in steps of 1024 with two decimals."""
    assert human_bytes(0) == "0 bytes"
    assert human_bytes(2047) == "2047 bytes"
    assert human_bytes(2048) == "2.00 KiB"
    assert human_bytes(5 * 1024 * 1024) == "5.00 MiB"
    assert human_bytes(1024**4) == "1024.00 GiB"
    assert human_bytes(3 * 1024**4) == "3.00 TiB"
    assert human_bytes(3000 * 1024**4) == "3000.00 TiB"


def counters(**kw: int) -> dict[str, int]:
    base = dict.fromkeys(
        [
            "from_client_packets",
            "from_client_bytes",
            "to_client_packets",
            "to_client_bytes",
            "from_client_lost_bytes",
            "to_client_lost_bytes",
            "dropped_spoofed",
            "dropped_malformed",
            "dropped_not_active",
            "dropped_isolated",
            "dropped_tun_write",
            "dropped_queue_full",
        ],
        0,
    )
    base.update(kw)
    return base


def test_vpn_stat_block() -> None:
    """The per-session block: labels padded with dots to one column, drops as lost."""
    session = {
        "session_id": 0x1234ABCD,
        "peer": "192.0.2.2:4000",
        "started_at": 0.0,
        "length_seconds": 3723.0,
        "ended_at": None,
        "client_addr": "198.18.5.2",
        "usage_state": "FREE",
        "counters": counters(
            to_client_bytes=4096,
            from_client_bytes=100,
            to_client_packets=3,
            from_client_packets=2,
            dropped_spoofed=5,
            from_client_lost_bytes=170,
        ),
    }
    assert vpn_stat([session]).splitlines() == [
        "  start at Thu, 01 Jan 1970 00:00:00 +0000 (length 01:02:03)",
        "  client addr........198.18.5.2",
        "  recv...............4.00 KiB",
        "  recv lost..........0 bytes",
        "  send...............100 bytes",
        "  send lost..........170 bytes",
        "  packets recv.......3",
        "  packets recv lost..0",
        "  packets send.......2",
        "  packets send lost..5",
        "  average rate.......0.00 KiB/s",
    ]
    full = vpn_stat([session], full=True)
    assert "  dropped spoofed....5" in full.splitlines()
    assert "  session id.........0x1234abcd" in full.splitlines()


def test_no_sessions() -> None:
    """No sessions: the original's one line."""
    assert vpn_stat([]) == "No VPN connections"


def test_client_status_text() -> None:
    """The state line first, the original's words."""
    text = client_status({"text": "VPN client lost connection", "server": "192.0.2.1:8089"})
    assert text.splitlines() == ["VPN client lost connection", "server: 192.0.2.1:8089"]


def test_client_status_names_the_tuns_state() -> None:
    text = client_status(
        {
            "text": "VPN client lost connection",
            "tun": "cvpn-cli",
            "tun_state": "up, tunnel routes removed",
        }
    )
    assert text.splitlines() == [
        "VPN client lost connection",
        "tun: cvpn-cli (up, tunnel routes removed)",
    ]


def test_the_average_rate_is_in_kib_per_second() -> None:
    """Bytes both ways over the session's length, in KiB (1024 bytes) per second."""
    session = {
        "session_id": 1,
        "peer": "192.0.2.2:4000",
        "started_at": 0.0,
        "length_seconds": 2.0,
        "client_addr": "198.18.5.2",
        "usage_state": "FREE",
        "counters": counters(to_client_bytes=3 * 1024 * 1024, from_client_bytes=1024 * 1024),
    }
    lines = vpn_stat([session]).splitlines()
    assert "  recv...............3.00 MiB" in lines
    assert "  average rate.......2048.00 KiB/s" in lines
