"""The file ``cellvpn-ctl client add`` writes: one client config that holds everything.

The server's answer to ``client_sign`` (its address, the name in its certificate, its CA, the
client's new certificate, the server key's pin) and the client's private key, made on the
operator's side, become one INI file that ``twistd cellvpn-client --config FILE`` runs as it is:
the PEM texts sit under their keys as indented continuation lines, so nothing else has to be
copied next to it. The file holds a private key, so it is written 0600.
"""

from __future__ import annotations

import datetime
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class EnrollFileError(Exception):
    """The client file cannot be written; the message is one line for the user."""


def _indented(pem: str) -> str:
    return "".join(f"    {line}\n" for line in pem.strip().splitlines())


def client_file(name: str, answer: Mapping[str, Any], key_pem: bytes) -> str:
    """The client config for ``name`` from the server's answer and the client's key."""
    until = datetime.datetime.fromtimestamp(float(answer["not_after"]), datetime.UTC)
    server_key = answer.get("server_key")
    lines = [
        f"# cellvpn client {name!r}, enrolled with cellvpn-ctl client add.",
        f"# Certificate serial {answer['serial']}, valid until {until:%Y-%m-%d %H:%M} UTC; the",
        "# server's operator can revoke it (cellvpn-ctl client revoke). This file holds the",
        "# client's private key: keep it private (mode 0600).",
        "# Start it with: twistd cellvpn-client --config THIS-FILE",
        "[client]",
        f"server = {answer['server']}",
        f"server_name = {answer['server_name']}",
        "# The server is trusted by its CA below; instead of ca, a pin of the server's key",
        "# survives its certificate renewals too:",
        f"# server_key = {server_key}" if server_key else "# server_key = (see the server's log)",
        "ca =",
    ]
    text = "\n".join(lines) + "\n" + _indented(str(answer["ca"]))
    text += "certificate =\n" + _indented(str(answer["certificate"]))
    text += "private_key =\n" + _indented(key_pem.decode("ascii"))
    return text


def write_private(path: Path, text: str, replace: bool = False) -> None:
    """Write ``text`` to a new file created 0600 (an existing one only with ``replace``)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if replace else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise EnrollFileError(f"{path} exists already (--force replaces it)") from None
    except OSError as e:
        raise EnrollFileError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        os.fchmod(fd, 0o600)
        data = text.encode("ascii")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except OSError as e:
        raise EnrollFileError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)


def qr_text(text: str) -> str:
    """``text`` as a QR code drawn with block characters, for a terminal."""
    import qrcode
    from qrcode.exceptions import DataOverflowError

    qr = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_L, border=2)
    qr.add_data(text.encode("ascii"))
    try:
        qr.make(fit=True)
    except (DataOverflowError, ValueError):
        raise EnrollFileError(
            f"the client file ({len(text)} bytes) is too large for one QR code"
        ) from None
    out = io.StringIO()
    qr.print_ascii(out=out, invert=True)
    return out.getvalue()
