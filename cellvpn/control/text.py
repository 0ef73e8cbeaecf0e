"""The original node CLI's human text, built from the JSON facts the services return."""

from __future__ import annotations

import email.utils
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

START_TEXT = {
    0: "VPN client started successfully",
    1: "VPN client already started",
    -1: "Can't start VPN client",
    -2: "Can't connect to VPN server",
    -3: "Can't connect to VPN server",
}
STOP_TEXT = {0: "VPN client stopped successfully", -1: "VPN client not stopped"}
CHECK_TEXT = {
    0: "VPN server checked successfully",
    -1: "Can't check VPN server: bad parameters",
    -2: "Can't connect to VPN server",
    -3: "No answer from VPN server",
}


def _ms(value: object) -> str:
    return "-" if value is None else f"{float(value):.2f}"  # type: ignore[arg-type]


def rate_text(bytes_per_second: float) -> str:
    """``12.34 MiB/s (103.5 Mbit/s)``: bytes as the rest of the figures, bits as links are sold."""
    return f"{human_bytes(int(bytes_per_second))}/s ({bytes_per_second * 8 / 1e6:.1f} Mbit/s)"


def check_figures(answer: Mapping[str, Any]) -> str:
    """``vpn_client check``'s figures: connect, TLS and setup times, round trips, upload and
    download with their rates, and the address the server saw."""
    lines = [
        f"connect {_ms(answer.get('connect_ms'))} ms, TLS {_ms(answer.get('tls_ms'))} ms, "
        f"session setup {_ms(answer.get('setup_ms'))} ms",
        f"rtt min/avg/max {_ms(answer.get('rtt_min_ms'))}/{_ms(answer.get('rtt_avg_ms'))}/"
        f"{_ms(answer.get('rtt_max_ms'))} ms ({answer.get('probes', 0)} probes)",
    ]
    for way, size, ms, rate in (
        ("upload", "sent_bytes", "upload_ms", "upload_bytes_per_second"),
        ("download", "received_bytes", "download_ms", "download_bytes_per_second"),
    ):
        nbytes = int(answer.get(size) or 0)
        if nbytes:
            lines.append(
                f"{way} {human_bytes(nbytes)} in {_ms(answer.get(ms))} ms: "
                f"{rate_text(float(answer.get(rate) or 0))}"
            )
        else:
            lines.append(f"{way}: none asked")
    if answer.get("seen_as"):
        lines.append(f"the server saw us as {answer['seen_as']}")
    return "\n".join(lines)


def check_results(rows: list[Mapping[str, Any]]) -> str:
    """``vpn_client check result``: one line per server, its state and its last figures."""
    if not rows:
        return "No servers configured or checked"
    lines = []
    for row in rows:
        line = f"{row['server']}: State {row['state']}"
        if row.get("checked_at"):
            line += f", checked {utc_time(float(row['checked_at']))}"
        if row.get("code") == 0:
            line += (
                f", rtt {_ms(row.get('rtt_avg_ms'))} ms, "
                f"up {rate_text(float(row.get('upload_bytes_per_second') or 0))}, "
                f"down {rate_text(float(row.get('download_bytes_per_second') or 0))}"
            )
        elif row.get("reason"):
            line += f": {row['reason']}"
        if not row.get("configured"):
            line += " (not configured)"
        lines.append(line)
    return "\n".join(lines)


def human_bytes(value: int) -> str:
    """``N bytes`` below 2048, then ``%.2f KiB/MiB/GiB/TiB`` in steps of 1024 (the original
    printed the same figures as Kb, Mb, ...: they are binary multiples of bytes, not bits)."""
    if value < 2048:
        return f"{value} bytes"
    size = float(value)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 2048 or unit == "TiB":
            return f"{size:.2f} {unit}"
    raise AssertionError("unreachable")


def _line(label: str, value: object) -> str:
    return f"  {label.ljust(19, '.')}{value}"


def _length(seconds: float) -> str:
    total = int(seconds)
    return f"{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"


def vpn_stat(sessions: list[Mapping[str, Any]], full: bool = False) -> str:
    """``vpn_stat``: a block per session, or ``No VPN connections``."""
    if not sessions:
        return "No VPN connections"
    blocks = []
    for s in sessions:
        c = s["counters"]
        start = datetime.fromtimestamp(s["started_at"], UTC)
        seconds = max(float(s["length_seconds"]), 1e-9)
        recv_lost = c["dropped_queue_full"]
        send_lost = (
            c["dropped_spoofed"]
            + c["dropped_malformed"]
            + c["dropped_not_active"]
            + c["dropped_isolated"]
            + c["dropped_tun_write"]
            + c.get("dropped_bad_offload", 0)
        )
        lines = [
            f"  start at {email.utils.format_datetime(start)} (length {_length(seconds)})",
            *([_line("client", s["client"])] if s.get("client") else []),
            _line("client addr", s.get("client_addr") or "0.0.0.0"),
            _line("recv", human_bytes(c["to_client_bytes"])),
            _line("recv lost", human_bytes(c["to_client_lost_bytes"])),
            _line("send", human_bytes(c["from_client_bytes"])),
            _line("send lost", human_bytes(c["from_client_lost_bytes"])),
            _line("packets recv", c["to_client_packets"]),
            _line("packets recv lost", recv_lost),
            _line("packets send", c["from_client_packets"]),
            _line("packets send lost", send_lost),
            _line(
                "average rate",
                f"{(c['to_client_bytes'] + c['from_client_bytes']) / seconds / 1024:.2f} KiB/s",
            ),
        ]
        if full:
            lines += [
                _line("session id", f"{s['session_id']:#010x}"),
                _line("peer", s["peer"]),
                _line("state", "ended" if s.get("ended_at") else "active"),
                _line("usage", s["usage_state"]),
                _line("dropped spoofed", c["dropped_spoofed"]),
                _line("dropped malformed", c["dropped_malformed"]),
                _line("dropped inactive", c["dropped_not_active"]),
                _line("dropped isolated", c["dropped_isolated"]),
                _line("dropped tun write", c["dropped_tun_write"]),
                _line("dropped bad offload", c.get("dropped_bad_offload", 0)),
                _line("dropped queue full", c["dropped_queue_full"]),
            ]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def utc_date(timestamp: float) -> str:
    return f"{datetime.fromtimestamp(timestamp, UTC):%Y-%m-%d %H:%M} UTC"


def utc_time(timestamp: float) -> str:
    return f"{datetime.fromtimestamp(timestamp, UTC):%Y-%m-%d %H:%M:%S} UTC"


def client_list(clients: list[Mapping[str, Any]]) -> str:
    """``client list``: one line per certificate the server signed."""
    if not clients:
        return "No enrolled clients"
    rows = [("NAME", "SERIAL", "EXPIRES", "STATE", "LAST SEEN", "SESSIONS")]
    for c in clients:
        seen = c.get("last_seen")
        rows.append(
            (
                str(c["name"]),
                str(c["serial"]),
                utc_date(float(c["not_after"])),
                str(c["state"]),
                utc_date(float(seen)) if seen else "never",
                ", ".join(f"{s:#010x}" for s in c.get("sessions", [])) or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def client_status(status: Mapping[str, Any]) -> str:
    """``vpn_client status``: the original's state line, then what cellvpn knows."""
    lines = [str(status["text"])]
    facts = [
        ("server", status.get("server")),
        ("address", status.get("address")),
        ("gateway", status.get("gateway")),
        (
            "tun",
            f"{status['tun']} ({status['tun_state']})"
            if status.get("tun_state")
            else status.get("tun"),
        ),
        ("session id", f"{status['session_id']:#010x}" if status.get("session_id") else None),
        ("reason", status.get("last_error")),
        ("warning", status.get("warning")),
    ]
    for label, value in facts:
        if value:
            lines.append(f"{label}: {value}")
    c = status.get("counters")
    if c:
        lines.append(
            f"sent: {human_bytes(c['sent_bytes'])} in {c['sent_packets']} packets, "
            f"received: {human_bytes(c['received_bytes'])} in {c['received_packets']} packets"
        )
    rtt = status.get("ping_rtt_ms")
    if rtt is not None:
        lines.append(f"ping rtt: {rtt:.2f} ms")
    return "\n".join(lines)
