"""The server side of a SOCKS5 handshake (RFC 1928), as bytes in and bytes out.

Only what a local proxy into the tunnel needs: the no-authentication method, and CONNECT to an
IPv4 address, a domain name or an IPv6 address. Anything else is answered as the RFC says
(method 0xFF, reply 0x07 or 0x08) and the connection closes; bytes that are not SOCKS5 at all
raise :class:`Socks5Error` and the connection closes without a word.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

VERSION = 5
NO_AUTH = 0x00
NO_ACCEPTABLE_METHOD = 0xFF
CMD_CONNECT = 0x01
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04


class Reply(IntEnum):
    """The REP field of a reply."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class Socks5Error(Exception):
    """The client does not speak SOCKS5: close the connection."""


@dataclass(frozen=True)
class ConnectRequest:
    """A complete CONNECT: ``host`` is an IP address in text form or an ASCII domain name."""

    host: str
    port: int


def reply(code: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    """A reply with the bound address (cellvpn always says 0.0.0.0:0: it binds nothing here)."""
    address = ipaddress.ip_address(host)
    atyp = ATYP_IPV4 if address.version == 4 else ATYP_IPV6
    return bytes((VERSION, code, 0, atyp)) + address.packed + struct.pack("!H", port)


class Socks5Handshake:
    """Feed it the client's bytes; it says what to answer and when the request is complete.

    After :meth:`feed` returns a :class:`ConnectRequest`, the caller answers with :func:`reply`
    once the outcome is known; ``rest`` holds bytes the client sent after its request. When
    ``refused`` is set, send :meth:`data_to_send` and close.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._out = bytearray()
        self._greeted = False
        self.request: ConnectRequest | None = None
        self.refused = False
        self.rest = b""

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def feed(self, data: bytes) -> ConnectRequest | None:
        """Take more bytes; the request once it is complete (only once), else None."""
        if self.request is not None or self.refused:
            self.rest += data
            return None
        self._buffer += data
        request = None
        if self._greeted or self._greeting():
            if not self.refused:
                request = self.request = self._request()
            if request is not None or self.refused:
                self.rest = bytes(self._buffer)
                self._buffer.clear()
        return request

    def _greeting(self) -> bool:
        buf = self._buffer
        if not buf:
            return False
        if buf[0] != VERSION:
            raise Socks5Error(f"not SOCKS5 (version byte {buf[0]})")
        if len(buf) < 2:
            return False
        count = buf[1]
        if count == 0:
            raise Socks5Error("SOCKS5 greeting offers no methods")
        if len(buf) < 2 + count:
            return False
        methods = bytes(buf[2 : 2 + count])
        del buf[: 2 + count]
        self._greeted = True
        if NO_AUTH in methods:
            self._out += bytes((VERSION, NO_AUTH))
        else:
            self._out += bytes((VERSION, NO_ACCEPTABLE_METHOD))
            self.refused = True
        return True

    def _request(self) -> ConnectRequest | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != VERSION:
            raise Socks5Error(f"SOCKS5 request has version byte {buf[0]}")
        if len(buf) < 4:
            return None
        cmd, atyp = buf[1], buf[3]
        if atyp == ATYP_IPV4:
            size = 4
        elif atyp == ATYP_IPV6:
            size = 16
        elif atyp == ATYP_DOMAIN:
            if len(buf) < 5:
                return None
            size = 1 + buf[4]
            if buf[4] == 0:
                raise Socks5Error("SOCKS5 request has an empty domain name")
        else:
            self._refuse(Reply.ADDRESS_TYPE_NOT_SUPPORTED)
            return None
        end = 4 + size + 2
        if len(buf) < end:
            return None
        raw = bytes(buf[4 : 4 + size])
        (port,) = struct.unpack_from("!H", buf, 4 + size)
        del buf[:end]
        if cmd != CMD_CONNECT:
            self._refuse(Reply.COMMAND_NOT_SUPPORTED)
            return None
        if atyp == ATYP_DOMAIN:
            try:
                host = raw[1:].decode("ascii")
            except UnicodeDecodeError:
                raise Socks5Error("SOCKS5 domain name is not ASCII") from None
        else:
            host = str(ipaddress.ip_address(raw))
        return ConnectRequest(host, port)

    def _refuse(self, code: Reply) -> None:
        self._out += reply(code)
        self.refused = True
