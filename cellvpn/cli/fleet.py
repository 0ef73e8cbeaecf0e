"""``cellvpn-ctl fleet``: the operator's side of a fleet of servers, run where the CA key is.

A fleet is the servers of one provider: they share the provider key, one CA and one ledger
(PostgreSQL). The CA's key never has to be on a server:

- ``fleet ca init DIR`` makes the fleet's CA in DIR (ca.pem, ca.key 0600);
- ``fleet server-cert DIR --state-dir S --name N...`` issues one server's certificate into
  ``S/tls`` (ca.pem, server.pem, server.key; no ca.key), for copying to that server;
- ``fleet client add|list|revoke`` enroll, list and revoke clients in the shared ledger, which
  every server of the fleet reads (``[tls] registry = ledger``). ``cellvpn-ctl client revoke``
  on any server does the same.

Nothing here talks to a server; the ledger commands open the ledger the URL names.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cellvpn.billing.interfaces import EnrolledRow, LedgerUnavailableError
from cellvpn.cli.control import CtlError
from cellvpn.config.fields import ParseError
from cellvpn.config.parsers import HOST_PORT
from cellvpn.conn import pki


def _emit(ns: argparse.Namespace, result: Any, words: str) -> int:
    print(json.dumps(result, indent=2, sort_keys=True) if ns.json else words)
    return 0


def _ca_init(ns: argparse.Namespace) -> int:
    folder = Path(ns.dir)
    try:
        authority = pki.create_fleet_ca(folder, ns.label or folder.resolve().name)
    except pki.TLSConfigError as e:
        raise CtlError(str(e)) from None
    fleet = pki.spki_fingerprint(authority.cert)
    return _emit(
        ns,
        {"ca": str(folder / pki.CA_CERT), "key": str(folder / pki.CA_KEY), "fleet": fleet},
        f"made the fleet's CA {folder / pki.CA_CERT} (its key {folder / pki.CA_KEY}, mode 0600:"
        f" keep it off the servers)\nfleet {fleet}",
    )


def _server_cert(ns: argparse.Namespace) -> int:
    try:
        authority = pki.load_fleet_ca(Path(ns.ca))
        identity = pki.issue_fleet_server(authority, Path(ns.state_dir), ns.name)
    except pki.TLSConfigError as e:
        raise CtlError(str(e)) from None
    until = identity.not_after
    return _emit(
        ns,
        {
            "certificate": str(identity.cert),
            "names": list(identity.names),
            "server_key": identity.spki,
            "not_after": until.timestamp() if until else None,
        },
        f"issued {identity.cert} for {', '.join(identity.names)}"
        + (f", valid until {until:%Y-%m-%d}" if until else "")
        + f"\nserver key SHA-256 (SPKI) {identity.spki}"
        + f"\nset [tls] names = {', '.join(identity.names)} on that server",
    )


def _fleet_of(folder: Path) -> str:
    path = folder / pki.CA_CERT if folder.is_dir() else folder
    try:
        return pki.spki_fingerprint(pki.load_certificates(path, "CA certificate")[0])
    except pki.TLSConfigError as e:
        raise CtlError(str(e)) from None


def _ledger(url: str) -> Any:
    from cellvpn.billing.sqlite import LedgerOpenError, open_ledger

    try:
        return open_ledger(url, create=False)
    except LedgerOpenError as e:
        raise CtlError(str(e)) from None


def _client(ns: argparse.Namespace) -> int:
    if ns.action == "add":
        return _client_add(ns)
    fleet = _fleet_of(Path(ns.ca))
    ledger = _ledger(ns.ledger)
    try:
        if ns.action == "list":
            rows = ledger.enrolled_clients(fleet)
            now = time.time()
            lines = [
                f"{r.name} {r.serial} "
                + (
                    "revoked"
                    if r.revoked_at is not None
                    else "expired"
                    if r.not_after <= now
                    else "ok"
                )
                for r in rows
            ]
            return _emit(ns, {"clients": [asdict(r) for r in rows]}, "\n".join(lines) or "none")
        if ns.name is None:
            raise CtlError("fleet client revoke needs the client's NAME")
        changed = ledger.revoke_client(fleet, ns.name, time.time())
        if not changed:
            raise CtlError(f"client {ns.name!r} has no certificate left to revoke in this fleet")
        serials = ", ".join(r.serial for r in changed)
        return _emit(
            ns,
            {"revoked": [asdict(r) for r in changed]},
            f"revoked client {ns.name} (certificate {serials}); every server of the fleet "
            "closes its sessions at its next read of the ledger ([tls] registry_refresh)",
        )
    except LedgerUnavailableError as e:
        raise CtlError(str(e)) from None
    finally:
        ledger.close()


def _client_add(ns: argparse.Namespace) -> int:
    from cellvpn.enroll import EnrollFileError, client_file, write_private

    if ns.name is None:
        raise CtlError("fleet client add needs the client's NAME")
    if ns.server is None or ns.out is None:
        raise CtlError("fleet client add needs --server HOST:PORT and --out FILE")
    try:
        server = HOST_PORT.parse(ns.server, Path.cwd())
    except ParseError:
        raise CtlError(f"--server {ns.server!r} is not host:port") from None
    out = Path(ns.out)
    if out.exists() and not ns.force:
        raise CtlError(f"{out} exists already (--force replaces it)")
    if not os.access(out.parent, os.W_OK):
        raise CtlError(f"cannot write {out}: {out.parent} is not a folder this user may write to")
    try:
        authority = pki.load_fleet_ca(Path(ns.ca))
        request = pki.new_client_request(ns.name)
        now = time.time()
        cert = pki.sign_client_request(
            authority,
            ns.name,
            request.csr_pem,
            ns.days,
            datetime.datetime.fromtimestamp(now, datetime.UTC),
        )
    except (pki.TLSConfigError, pki.EnrollmentError) as e:
        raise CtlError(str(e)) from None
    fleet = pki.spki_fingerprint(authority.cert)
    row = EnrolledRow(
        fleet,
        ns.name,
        pki.serial_text(cert),
        pki.fingerprint_of(cert),
        cert.not_valid_after_utc.timestamp(),
        now,
    )
    ledger = _ledger(ns.ledger)
    try:
        if not ledger.enroll_client(row, now):
            raise CtlError(
                f"client {ns.name!r} is enrolled already; revoke it first "
                f"(cellvpn-ctl fleet client revoke {ns.name}) or choose another name"
            )
    except LedgerUnavailableError as e:
        raise CtlError(str(e)) from None
    finally:
        ledger.close()
    answer = {
        "serial": row.serial,
        "not_after": row.not_after,
        "server": str(server),
        "server_name": ns.server_name or server.host,
        "ca": authority.pem.decode("ascii"),
        "certificate": pki.certificate_pem(cert).decode("ascii"),
    }
    try:
        write_private(out, client_file(ns.name, answer, request.key_pem), replace=ns.force)
    except EnrollFileError as e:
        raise CtlError(str(e)) from None
    return _emit(
        ns,
        {"serial": row.serial, "not_after": row.not_after, "file": str(out), "fleet": fleet},
        f"enrolled client {ns.name} in fleet {fleet[:16]}: certificate {row.serial}\n"
        f"wrote {out} (mode 0600; it holds the client's key)",
    )


def add_fleet_commands(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """``cellvpn-ctl fleet ...``."""
    p = subparsers.add_parser(
        "fleet",
        parents=[common],
        help="a fleet's CA, its servers' certificates and its clients (run where the CA key is)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    sub = p.add_subparsers(dest="fleet_command", metavar="WHAT", required=True)
    ca = sub.add_parser("ca", parents=[common], help="make the fleet's CA")
    ca.add_argument("action", choices=["init"])
    ca.add_argument("dir", help="folder for ca.pem and ca.key (made 0700)")
    ca.add_argument("--label", help="a name for the CA's subject (default: the folder's name)")
    ca.set_defaults(handler=_ca_init)
    sc = sub.add_parser(
        "server-cert", parents=[common], help="issue a server's certificate from the fleet's CA"
    )
    sc.add_argument("ca", help="the fleet's CA folder (ca.pem, ca.key)")
    sc.add_argument("--state-dir", required=True, help="the server's state_dir (or a copy of it)")
    sc.add_argument(
        "--name", action="append", required=True, help="a DNS name or address (repeat for more)"
    )
    sc.set_defaults(handler=_server_cert)
    cl = sub.add_parser("client", parents=[common], help="the fleet's clients, in its ledger")
    cl.add_argument("action", choices=["add", "list", "revoke"])
    cl.add_argument("name", nargs="?", help="the client's name (add, revoke)")
    cl.add_argument("--ca", required=True, help="the fleet's CA folder (add) or its ca.pem")
    cl.add_argument("--ledger", required=True, metavar="URL", help="the fleet's ledger")
    cl.add_argument("--server", help="host:port the client connects to (add)")
    cl.add_argument("--server-name", help="name to check in the server's certificate (add)")
    cl.add_argument("--days", type=int, default=365, help="certificate lifetime (add; 365)")
    cl.add_argument("--out", help="the client's config file, mode 0600 (add)")
    cl.add_argument("--force", action="store_true", help="replace an existing --out file (add)")
    cl.set_defaults(handler=_client)
