"""Sans-IO wire codecs: bytes in, values out, and back. No reactor, no sockets.

Every decoder in this package raises :class:`cellvpn.wire.errors.DecodeError` (and nothing
else) for input it cannot accept.
"""
