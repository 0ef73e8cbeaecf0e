"""Renewing the server certificate while running: the timer, and new connections getting the
new certificate for the same key (TLS on 127.0.0.1)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from cellvpn.conn import pki
from cellvpn.conn.tls import client_tls, replace_server_context, server_tls
from cellvpn.server.renewal import Renewal
from tests.conn.test_tls import exchange, tls_server


def identity(tmp_path: Path, created: bool) -> pki.ServerIdentity:
    return replace(pki.ensure_server_identity(tmp_path, ["vpn.test"]), created=created)


def test_a_new_certificate_is_installed_and_an_unchanged_one_is_not(tmp_path: Path) -> None:
    clock = Clock()
    answers = [identity(tmp_path, False), identity(tmp_path, True)]
    installed: list[pki.ServerIdentity] = []

    async def renew() -> pki.ServerIdentity:
        return answers.pop(0)

    renewal = Renewal(clock, renew, installed.append, interval=100)
    renewal.start()
    clock.advance(99)
    assert renewal.checks == 0
    clock.advance(1)
    assert renewal.checks == 1 and installed == []
    clock.advance(100)
    assert renewal.checks == 2 and renewal.renewals == 1 and len(installed) == 1
    renewal.stop()
    clock.advance(1000)
    assert renewal.checks == 2


def test_a_failed_check_is_logged_and_the_next_one_runs(tmp_path: Path) -> None:
    clock = Clock()
    calls = 0

    async def renew() -> pki.ServerIdentity:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise pki.TLSConfigError("CA key state/tls/ca.key does not exist")
        return identity(tmp_path, True)

    installed: list[pki.ServerIdentity] = []
    said: list[str] = []
    renewal = Renewal(clock, renew, installed.append, interval=10)

    def observe(event: dict[str, Any]) -> None:
        if "why" in event:
            said.append(str(event["why"]))

    globalLogPublisher.addObserver(observe)
    try:
        renewal.start()
        clock.advance(10)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert installed == [] and "ca.key does not exist" in said[-1]
    clock.advance(10)
    assert len(installed) == 1
    renewal.stop()


@pytest_twisted.ensureDeferred
async def test_new_connections_get_the_renewed_certificate(reactor: Any, tmp_path: Path) -> None:
    old = pki.ensure_server_identity(tmp_path, ["vpn.test"])
    creator = server_tls(old.cert, old.key, None)
    async with tls_server(reactor, creator) as (port, _):
        pin = client_tls("x", None, None, None, None, server_key=old.spki)
        first = await exchange(reactor, port, pin)
        new = pki.ensure_server_identity(tmp_path, ["vpn.test", "127.0.0.1"])
        replace_server_context(creator, server_tls(new.cert, new.key, None))
        second = await exchange(reactor, port, pin)
    assert first.peer_fp == old.fingerprint and second.peer_fp == new.fingerprint
    assert new.spki == old.spki
