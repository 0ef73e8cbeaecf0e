"""The enrolled-client registry and the enrollment logic, without a reactor or a network."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cellvpn.conn import pki
from cellvpn.server.access import AccessError, Enrollment
from cellvpn.server.clients import ClientRecord, ClientRegistry, RegistryError
from cellvpn.server.session import not_enrolled
from cellvpn.wire.setup import CloseCode

T = TypeVar("T")


def run(work: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(work)


def record(name: str, serial: str, not_after: float = 2e9, revoked: float | None = None) -> Any:
    return ClientRecord(name, serial, "ab" * 32, not_after, 1e9, revoked)


# --- the registry -----------------------------------------------------------------------------


def test_revoke_marks_every_live_certificate_of_the_name() -> None:
    reg = ClientRegistry([record("alice", "1"), record("bob", "2")])
    changed = reg.revoke("alice", 1.5e9)
    assert [r.serial for r in changed] == ["1"] and changed[0].revoked_at == 1.5e9
    assert reg.is_revoked("1") and not reg.is_revoked("2") and not reg.is_revoked("99")
    with pytest.raises(RegistryError, match="revoked already"):
        reg.revoke("alice", 1.6e9)
    with pytest.raises(RegistryError, match="no client is named 'carol'"):
        reg.revoke("carol", 1.6e9)


def test_a_name_gets_a_second_certificate_only_once_the_first_is_revoked_or_expired() -> None:
    reg = ClientRegistry([record("alice", "1"), record("old", "2", not_after=1e9)])
    with pytest.raises(RegistryError, match="enrolled already; revoke it first"):
        reg.check_new("alice", 1.5e9)
    reg.check_new("old", 1.5e9)  # expired
    reg.revoke("alice", 1.5e9)
    reg.check_new("alice", 1.5e9)
    with pytest.raises(RegistryError, match="serial 2 is known already"):
        reg.add(record("x", "2"))


def test_the_file_round_trips_and_bad_files_are_named() -> None:
    reg = ClientRegistry([record("alice", "a1"), record("bob", "b2", revoked=1.2e9)])
    again = ClientRegistry.from_json(reg.to_json())
    assert again.records() == reg.records()
    assert again.is_revoked("b2")
    for text, said in [
        ("{", "is not JSON"),
        ('{"version": 2, "clients": []}', "expected a version 1"),
        ('{"version": 1}', "expected a list"),
        ('{"version": 1, "clients": [{"name": "x"}]}', "client 1 is not a valid record"),
        (json.dumps({"version": 1, "clients": [{**vars(record("x", "zz"))}]}), "client 1"),
    ]:
        with pytest.raises(RegistryError, match=said):
            ClientRegistry.from_json(text, "/state/clients.json")


# --- enrollment -------------------------------------------------------------------------------


class FakeSession:
    def __init__(self, session_id: int, serial: str | None) -> None:
        self.session_id: int | None = session_id
        self.client_serial = serial
        self.closed: tuple[int, str] | None = None

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


class Saved:
    def __init__(self) -> None:
        self.texts: list[str] = []

    async def __call__(self, text: str) -> None:
        self.texts.append(text)


def enrollment(tmp_path: Path, now: float = 1.9e9) -> tuple[Enrollment, Saved]:
    saved = Saved()
    return Enrollment(pki.load_authority(tmp_path), ClientRegistry(), saved, lambda: now), saved


def test_sign_records_and_saves_before_answering(tmp_path: Path) -> None:
    enr, saved = enrollment(tmp_path)
    request = pki.new_client_request("alice")
    answer = run(enr.sign("alice", request.csr_pem.decode(), 30))
    assert answer["name"] == "alice" and "BEGIN CERTIFICATE" in answer["certificate"]
    assert answer["ca"] == enr.authority.pem.decode()  # type: ignore[union-attr]
    [text] = saved.texts
    assert ClientRegistry.from_json(text).get(answer["serial"]) is not None
    with pytest.raises(AccessError, match="enrolled already"):
        run(enr.sign("alice", request.csr_pem.decode(), 30))
    with pytest.raises(AccessError, match="cannot name a client"):
        run(enr.sign("a b", request.csr_pem.decode(), 30))
    assert len(saved.texts) == 1


def test_a_server_for_any_client_does_not_enroll() -> None:
    async def save(text: str) -> None:
        raise AssertionError("nothing to save")

    enr = Enrollment(None, ClientRegistry(), save, lambda: 0.0)
    with pytest.raises(AccessError, match=r"clients = any"):
        run(enr.sign("alice", "csr", 30))


def test_judge_names_serves_and_refuses(tmp_path: Path) -> None:
    from cryptography import x509

    enr, _ = enrollment(tmp_path)
    assert enr.judge(None).refused is None and enr.judge(None).name is None
    request = pki.new_client_request("alice")
    answer = run(enr.sign("alice", request.csr_pem.decode(), 30))
    cert = x509.load_pem_x509_certificate(answer["certificate"].encode())
    verdict = enr.judge(cert)
    assert (verdict.name, verdict.serial, verdict.refused) == ("alice", answer["serial"], None)
    assert enr.registry.last_seen[answer["serial"]] == 1.9e9
    run(enr.revoke("alice", []))
    verdict = enr.judge(cert)
    assert verdict.refused is not None and "was revoked" in verdict.refused
    other = pki.sign_client_request(
        enr.authority,  # type: ignore[arg-type]
        "unlisted",
        pki.new_client_request("unlisted").csr_pem,
        30,
    )
    assert enr.judge(other).name == "unlisted" and enr.judge(other).refused is None


def test_revoke_saves_then_closes_only_that_clients_sessions(tmp_path: Path) -> None:
    enr, saved = enrollment(tmp_path)
    a = run(enr.sign("alice", pki.new_client_request("alice").csr_pem.decode(), 30))
    b = run(enr.sign("bob", pki.new_client_request("bob").csr_pem.decode(), 30))
    sessions = [FakeSession(1, a["serial"]), FakeSession(2, b["serial"]), FakeSession(3, None)]
    listed = {c["name"]: c for c in enr.listing(sessions)}
    assert listed["alice"]["sessions"] == [1] and listed["alice"]["state"] == "ok"
    done = run(enr.revoke("alice", sessions))
    assert done["sessions_closed"] == [1]
    assert sessions[0].closed is not None and sessions[0].closed[0] == CloseCode.REFUSED
    assert sessions[1].closed is None and sessions[2].closed is None
    assert ClientRegistry.from_json(saved.texts[-1]).is_revoked(a["serial"])
    assert {c["name"]: c["state"] for c in enr.listing([])} == {"alice": "revoked", "bob": "ok"}
    with pytest.raises(AccessError, match="revoked already"):
        run(enr.revoke("alice", sessions))


def test_handshake_failures_of_clients_that_are_not_enrolled_are_named() -> None:
    said = not_enrolled("TLS handshake failed: peer did not return a certificate (...)")
    assert said is not None and "presented no client certificate" in said
    said = not_enrolled("TLS handshake failed: certificate verify failed")
    assert said is not None and "does not verify" in said
    said = not_enrolled("TLS handshake failed: certificate verify failed", "it expired (x)")
    assert said == (
        "refused: it expired (x) ([tls] clients = enrolled; enroll it with cellvpn-ctl client add)"
    )
    assert not_enrolled("TLS handshake failed: wrong version number") is None
