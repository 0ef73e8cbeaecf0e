"""Who may use the server: enrolled clients, their certificates and their revocations.

:class:`Enrollment` answers the control commands ``client_sign``, ``client_list`` and
``client_revoke`` and judges each client certificate at session setup. It signs with the CA it
was given and keeps the :class:`~cellvpn.server.clients.ClientRegistry`; the file it is kept in
is written by a ``save`` function the server passes in (off the reactor thread), and the live
sessions are reached through the narrow :class:`LiveSession`.
"""

from __future__ import annotations

import datetime
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict
from typing import Any, Protocol

from cryptography import x509

from cellvpn.conn import pki
from cellvpn.server.clients import ClientRecord, ClientRegistry, RegistryError
from cellvpn.wire.setup import CloseCode

#: The file in ``state_dir`` that holds the registry.
REGISTRY_FILE = "clients.json"


class AccessError(Exception):
    """A control request refused; the message is one line for the operator."""


class LiveSession(Protocol):
    """What revocation and listing need of a session."""

    client_serial: str | None
    session_id: int | None

    def close(self, code: int, reason: str) -> None: ...


class SharedClients(Protocol):
    """The fleet's registry in the shared ledger (:mod:`cellvpn.server.fleetclients`)."""

    async def add(self, record: ClientRecord, now: float) -> bool: ...

    async def revoke(self, name: str, now: float) -> list[ClientRecord]: ...


class Verdict:
    """What setup does with a client certificate: serve it (with a name) or refuse it (why)."""

    __slots__ = ("name", "refused", "serial")

    def __init__(self, name: str | None, serial: str | None, refused: str | None) -> None:
        self.name = name
        self.serial = serial
        self.refused = refused


class Enrollment:
    """The server's enrolled clients; every change is saved before its answer is given."""

    def __init__(
        self,
        authority: pki.CertificateAuthority | None,
        registry: ClientRegistry,
        save: Callable[[str], Awaitable[None]],
        clock: Callable[[], float],
    ) -> None:
        self.authority = authority
        self.registry = registry
        self._save = save
        self._clock = clock
        #: the fleet's registry in the shared ledger; None: this server's clients.json
        self.shared: SharedClients | None = None

    # --- session setup ---------------------------------------------------------------------

    def judge(self, cert: x509.Certificate | None) -> Verdict:
        """Serve, name or refuse the client that presented ``cert`` (None: it sent none)."""
        if cert is None:
            return Verdict(None, None, None)
        serial = pki.serial_text(cert)
        record = self.registry.get(serial)
        if record is None:
            return Verdict(pki.client_common_name(cert), serial, None)
        if record.revoked:
            return Verdict(
                record.name,
                serial,
                f"client {record.name!r} (certificate {serial}) was revoked by the server's "
                "operator",
            )
        self.registry.seen(serial, self._clock())
        return Verdict(record.name, serial, None)

    # --- control ---------------------------------------------------------------------------

    def require_authority(self) -> pki.CertificateAuthority:
        """The CA that signs, or the reason this server enrolls nobody."""
        if self.authority is None and self.shared is not None:
            raise AccessError(
                "this server holds no CA key: its fleet's clients are enrolled where the CA "
                "key is (cellvpn-ctl fleet client add), and every server knows them"
            )
        if self.authority is None:
            raise AccessError(
                "this server does not enroll clients: it serves any client "
                "([tls] clients = any); set clients = enrolled to enroll them"
            )
        return self.authority

    async def sign(self, name: str, csr: str, days: int) -> dict[str, Any]:
        """Sign a client's request and record it; the certificate and the CA, as PEM text."""
        authority = self.require_authority()
        now = self._clock()
        try:
            pki.check_client_name(name)
            self.registry.check_new(name, now)
            cert = pki.sign_client_request(
                authority,
                name,
                csr.encode("ascii", "replace"),
                days,
                datetime.datetime.fromtimestamp(now, datetime.UTC),
            )
        except (pki.EnrollmentError, RegistryError) as e:
            raise AccessError(str(e)) from None
        record = ClientRecord(
            name=name,
            serial=pki.serial_text(cert),
            fingerprint=pki.fingerprint_of(cert),
            not_after=cert.not_valid_after_utc.timestamp(),
            enrolled_at=now,
        )
        if self.shared is not None:
            if not await self.shared.add(record, now):
                raise AccessError(
                    f"client {name!r} is enrolled already (on a server of this fleet); revoke "
                    f"it first (cellvpn-ctl client revoke {name}) or choose another name"
                )
            self.registry.add(record)
        else:
            self.registry.add(record)
            await self._save(self.registry.to_json())
        return {
            **asdict(record),
            "certificate": pki.certificate_pem(cert).decode("ascii"),
            "ca": authority.pem.decode("ascii"),
        }

    def listing(self, sessions: Iterable[LiveSession]) -> list[dict[str, Any]]:
        """Every certificate ever signed, with when it was last seen and its live sessions."""
        live: dict[str, list[int]] = {}
        for session in sessions:
            if session.client_serial is not None and session.session_id is not None:
                live.setdefault(session.client_serial, []).append(session.session_id)
        now = self._clock()
        out = []
        for record in self.registry.records():
            state = "revoked" if record.revoked else "expired" if record.not_after <= now else "ok"
            out.append(
                {
                    **asdict(record),
                    "state": state,
                    "last_seen": self.registry.last_seen.get(record.serial),
                    "sessions": sorted(live.get(record.serial, [])),
                }
            )
        return out

    async def revoke(self, name: str, sessions: Iterable[LiveSession]) -> dict[str, Any]:
        """Revoke ``name``'s certificates, save that, then close its live sessions."""
        if self.shared is not None:
            changed = await self.shared.revoke(name, self._clock())
            if not changed:
                raise AccessError(
                    f"client {name!r} has no certificate left to revoke in this fleet "
                    "(cellvpn-ctl client list shows them)"
                )
            self.registry.update(changed)
        else:
            try:
                changed = self.registry.revoke(name, self._clock())
            except RegistryError as e:
                raise AccessError(str(e)) from None
            await self._save(self.registry.to_json())
        closed = self._close_revoked(changed, sessions)
        return {"revoked": [asdict(r) for r in changed], "sessions_closed": closed}

    def refreshed(
        self, records: Iterable[ClientRecord], sessions: Iterable[LiveSession]
    ) -> list[int]:
        """The fleet's registry read again: keep it, close the sessions of certificates
        revoked elsewhere since; their ids."""
        newly = self.registry.replace_all(records)
        return self._close_revoked(newly, sessions) if newly else []

    @staticmethod
    def _close_revoked(
        changed: Iterable[ClientRecord], sessions: Iterable[LiveSession]
    ) -> list[int]:
        by_serial = {r.serial: r.name for r in changed}
        closed = []
        for session in list(sessions):
            name = by_serial.get(session.client_serial or "")
            if name is not None:
                if session.session_id is not None:
                    closed.append(session.session_id)
                session.close(
                    CloseCode.REFUSED, f"client {name!r} was revoked by the server's operator"
                )
        return sorted(closed)
