"""A fleet's enrolled clients in a shared ledger: two servers' registries on one real ledger.

Each server's :class:`Enrollment` keeps the fleet's registry in memory and reads it again on a
timer (a ``task.Clock`` here); an enrollment or a revocation made through one holds on the
other at its next read, and the revoked client's live sessions there are closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from cellvpn.billing.interfaces import EnrolledRow, LedgerUnavailableError
from cellvpn.billing.sqlite import SqliteLedger
from cellvpn.conn import pki
from cellvpn.server.access import AccessError, Enrollment
from cellvpn.server.clients import ClientRegistry
from cellvpn.server.fleetclients import FleetClients
from cellvpn.wire.setup import CloseCode

T = TypeVar("T")
NOW = 1.9e9


def run(work: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(work)


class SyncLedger:
    """The narrow FleetLedger over a real SQLite ledger, answered at once."""

    def __init__(self, ledger: SqliteLedger) -> None:
        self.ledger = ledger
        self.down = False

    def _call(self, f: Any, *args: Any) -> Deferred[Any]:
        if self.down:
            return fail(LedgerUnavailableError("the database is away"))
        return succeed(f(*args))

    def enroll_client(self, row: EnrolledRow, now: float | None = None) -> Deferred[bool]:
        return self._call(self.ledger.enroll_client, row, now)

    def revoke_client(self, fleet: str, name: str, now: float) -> Deferred[list[EnrolledRow]]:
        return self._call(self.ledger.revoke_client, fleet, name, now)

    def enrolled_clients(self, fleet: str) -> Deferred[list[EnrolledRow]]:
        return self._call(self.ledger.enrolled_clients, fleet)


class Session:
    def __init__(self, session_id: int, serial: str | None) -> None:
        self.session_id = session_id
        self.client_serial = serial
        self.closed: tuple[int, str] | None = None

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


async def _never(text: str) -> None:
    raise AssertionError("a fleet's registry is not saved to clients.json")


class Server:
    """One server of the fleet: its enrollment, its sessions, its timer."""

    def __init__(
        self, ledger: SyncLedger, authority: pki.CertificateAuthority | None, fleet: str
    ) -> None:
        self.clock = Clock()
        self.sessions: list[Session] = []
        self.enrollment = Enrollment(authority, ClientRegistry(), _never, lambda: NOW)
        self.shared = FleetClients(
            ledger, fleet, self.enrollment, lambda: self.sessions, self.clock, 10.0
        )
        self.enrollment.shared = self.shared
        self.shared.start()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[SyncLedger, pki.CertificateAuthority, str]]:
    ledger = SqliteLedger(tmp_path / "ledger.db")
    authority = pki.create_fleet_ca(tmp_path / "ca", "test fleet")
    yield SyncLedger(ledger), authority, pki.spki_fingerprint(authority.cert)
    ledger.close()


def _cert(answer: dict[str, Any]) -> x509.Certificate:
    return x509.load_pem_x509_certificate(answer["certificate"].encode())


def test_an_enrollment_on_one_server_is_known_to_the_other(
    fleet: tuple[SyncLedger, pki.CertificateAuthority, str],
) -> None:
    ledger, authority, fid = fleet
    one, two = Server(ledger, authority, fid), Server(ledger, None, fid)
    answer = run(one.enrollment.sign("alice", pki.new_client_request("alice").csr_pem.decode(), 30))
    assert two.enrollment.registry.get(answer["serial"]) is None
    two.clock.advance(10)
    assert two.enrollment.registry.get(answer["serial"]) is not None
    with pytest.raises(AccessError, match="no CA key"):
        run(two.enrollment.sign("bob", pki.new_client_request("bob").csr_pem.decode(), 30))
    # the name is taken in the fleet even where the local registry has not read it yet
    three = Server(ledger, authority, fid)
    with pytest.raises(AccessError, match="enrolled already"):
        run(three.enrollment.sign("alice", pki.new_client_request("alice").csr_pem.decode(), 30))


def test_a_revocation_on_one_server_closes_the_sessions_on_the_other(
    fleet: tuple[SyncLedger, pki.CertificateAuthority, str],
) -> None:
    ledger, authority, fid = fleet
    one, two = Server(ledger, authority, fid), Server(ledger, None, fid)
    a = run(one.enrollment.sign("alice", pki.new_client_request("alice").csr_pem.decode(), 30))
    b = run(one.enrollment.sign("bob", pki.new_client_request("bob").csr_pem.decode(), 30))
    two.clock.advance(10)
    two.sessions = [Session(7, a["serial"]), Session(8, b["serial"])]
    assert two.enrollment.judge(_cert(a)).refused is None
    done = run(one.enrollment.revoke("alice", []))
    assert [r["serial"] for r in done["revoked"]] == [a["serial"]]
    assert one.enrollment.judge(_cert(a)).refused is not None, "at once where it was made"
    assert two.enrollment.judge(_cert(a)).refused is None, "not read yet"
    two.clock.advance(10)
    assert two.enrollment.judge(_cert(a)).refused is not None
    assert two.sessions[0].closed is not None and two.sessions[0].closed[0] == CloseCode.REFUSED
    assert two.sessions[1].closed is None
    with pytest.raises(AccessError, match="no certificate left to revoke"):
        run(two.enrollment.revoke("alice", []))


def test_while_the_ledger_is_away_the_last_registry_serves(
    fleet: tuple[SyncLedger, pki.CertificateAuthority, str],
) -> None:
    ledger, authority, fid = fleet
    one = Server(ledger, authority, fid)
    a = run(one.enrollment.sign("alice", pki.new_client_request("alice").csr_pem.decode(), 30))
    ledger.ledger.revoke_client(fid, "alice", NOW)
    ledger.down = True
    one.enrollment.registry = ClientRegistry(one.enrollment.registry.records())
    one.clock.advance(10)
    assert one.shared.stale and one.enrollment.judge(_cert(a)).refused is None
    ledger.down = False
    one.clock.advance(10)
    assert not one.shared.stale and one.enrollment.judge(_cert(a)).refused is not None
