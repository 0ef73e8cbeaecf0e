"""What ``cellvpn-ctl`` shows while a check or a start waits."""

from __future__ import annotations

import io

from cellvpn.cli.progress import StepPrinter, TerminalBar, bar_line


def test_the_bar_says_how_far_and_where() -> None:
    for progress, line in (
        (
            {"phase": "tls", "text": "TLS handshake", "done_bytes": 0, "total_bytes": 2048},
            "[..........]   0% TLS handshake 0 bytes of 2.00 KiB",
        ),
        (
            {"phase": "upload", "text": "upload", "done_bytes": 1024, "total_bytes": 4096},
            "[##........]  25% upload 1024 bytes of 4.00 KiB",
        ),
        (
            {"phase": "done", "text": "done", "done_bytes": 0, "total_bytes": 0},
            "[##########] 100% done",
        ),
        (
            {"phase": "rtt", "text": "round trips", "total_bytes": 0},
            "[..........]   0% round trips",
        ),
    ):
        assert bar_line(progress, width=10) == line


def test_the_bar_is_drawn_in_place_and_cleared() -> None:
    out = io.StringIO()
    bar = TerminalBar(out)
    bar.clear()
    assert out.getvalue() == ""  # nothing drawn, nothing to clear
    bar.draw(None)  # the check is not running (yet)
    bar.draw({"phase": "rtt", "text": "round trips", "done_bytes": 0, "total_bytes": 0})
    bar.clear()
    assert out.getvalue() == "\r\x1b[K" + bar_line({"text": "round trips"}) + "\r\x1b[K"


def test_each_step_of_a_start_is_said_once() -> None:
    out = io.StringIO()
    steps = StepPrinter(out)
    first = {"after_ms": 0.0, "text": "connecting to 192.0.2.1:8089 (TCP)"}
    second = {"after_ms": 1.25, "text": "TLS handshake"}
    steps.seen({"start_steps": [first]})
    steps.seen({"start_steps": [first]})
    steps.seen({"start_steps": [first, second]})
    steps.seen("not a status")
    assert out.getvalue().splitlines() == [
        "  +0.0 ms  connecting to 192.0.2.1:8089 (TCP)",
        "  +1.2 ms  TLS handshake",
    ]


def test_check_sizes_and_timeout_take_the_older_spellings_too() -> None:
    from cellvpn.cli.main import _check_sizes, build_parser

    def sizes(*words: str) -> tuple[int, int, float]:
        ns = build_parser().parse_args(["vpn_client", "check", "-addr", "h", "-port", "1", *words])
        return _check_sizes(ns)

    assert sizes() == (262144, 262144, 10.0)
    assert sizes("--send", "5", "--recv", "6", "--timeout", "1500") == (5, 6, 1.5)
    assert sizes("-size", "100", "-timeout", "3") == (100, 100, 3.0)
    assert sizes("-size", "100", "--recv", "7") == (100, 7, 10.0)
    ns = build_parser().parse_args(["vpn_client", "check", "result", "--json"])
    assert (ns.action, ns.what, ns.json) == ("check", "result", True)
