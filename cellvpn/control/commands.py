"""The AMP vocabulary of the control socket.

One command, ``Call(command, args) -> result``, with JSON arguments and results: the services
decide what each command means, and ``cellvpn-ctl`` prints the result as text or JSON. JSON
values may exceed AMP's 64 KiB value limit (``vpn_stat`` of many sessions), so they are split
over several keys.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.protocols import amp

_CHUNK = 60000


class BigJSON(amp.Argument):
    """A JSON value split into ``name``, ``name.1``, ``name.2`` ... keys of at most 60,000 bytes."""

    def toBox(
        self, name: bytes, strings: dict[bytes, bytes], objects: dict[str, Any], proto: Any
    ) -> None:  # type: ignore[override]
        raw = json.dumps(objects[name.decode()], separators=(",", ":")).encode()
        chunks = [raw[i : i + _CHUNK] for i in range(0, len(raw), _CHUNK)] or [b""]
        strings[name] = chunks[0]
        for i, chunk in enumerate(chunks[1:], 1):
            strings[name + b"." + str(i).encode()] = chunk

    def fromBox(
        self, name: bytes, strings: dict[bytes, bytes], objects: dict[str, Any], proto: Any
    ) -> None:  # type: ignore[override]
        parts = [strings[name]]
        i = 1
        while (key := name + b"." + str(i).encode()) in strings:
            parts.append(strings[key])
            i += 1
        objects[name.decode()] = json.loads(b"".join(parts))


class ControlError(Exception):
    """A command that the service understood but refused; the message is for the user."""


class UnknownCommandError(Exception):
    """The service does not offer this command."""


class Call(amp.Command):
    arguments = [(b"command", amp.Unicode()), (b"args", BigJSON())]
    response = [(b"result", BigJSON())]
    errors = {ControlError: b"CONTROL_ERROR", UnknownCommandError: b"UNKNOWN_COMMAND"}
