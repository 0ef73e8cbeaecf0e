"""systemd notifications: the datagram's text, and its delivery to $NOTIFY_SOCKET."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cellvpn.sdnotify import Notifier, address_of, message, reloading_fields


def test_message_and_addresses() -> None:
    assert message(READY=1, STATUS="serving 3 sessions") == b"READY=1\nSTATUS=serving 3 sessions"
    assert address_of("/run/systemd/notify") == "/run/systemd/notify"
    assert address_of("@abstract/name") == b"\0abstract/name"
    assert reloading_fields(lambda: 5_000_123_456) == {"RELOADING": 1, "MONOTONIC_USEC": 5_000_123}
    with pytest.raises(ValueError):
        message(STATUS="two\nlines")


def test_a_datagram_reaches_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        assert notifier.enabled and notifier.notify(READY=1)
        assert listener.recv(4096) == b"READY=1"


def test_without_systemd_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and notifier.notify(READY=1) is False
    assert notifier.last_error is None


def test_a_socket_that_is_gone_is_an_error_kept_not_raised(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "none")})
    assert notifier.notify(READY=1) is False
    assert notifier.last_error is not None and "cannot notify systemd" in notifier.last_error
