"""Where the fields the data path reads sit in an IP packet: one place for the offsets.

The forwarder reads a handful of fields of every packet by index; naming them here, beside
the other layouts of ``wire/``, keeps the hot path free of bare numbers and lets the offload
path shift them past the virtio-net header by one constant. Slices and indices, not parsers:
the hot path slices ``bytes`` and ``memoryview`` objects with them directly.
"""

from __future__ import annotations

import struct

#: IPv4 without options, and the IPv6 fixed header
IPV4_HEADER = 20
IPV6_HEADER = 40
#: the first byte: the version in its high nibble; 0x45 is IPv4 with a 20-byte header
VERSION = 0
IPV4_PLAIN_FIRST_BYTE = 0x45
#: IPv4: total length (2 bytes, big-endian), protocol, source and destination
IPV4_TOTAL_LENGTH = 2
IPV4_PROTOCOL = 9
IPV4_ADDRESSES = 12
IPV4_SRC = slice(12, 16)
IPV4_DST = slice(16, 20)
#: IPv6: payload length (2 bytes, big-endian), next header, source and destination
IPV6_PAYLOAD_LENGTH = 4
IPV6_NEXT_HEADER = 6
IPV6_ADDRESSES = 8
IPV6_SRC = slice(8, 24)
IPV6_DST = slice(24, 40)
#: the protocol number of TCP, in IPv4's protocol and IPv6's next header
TCP = 6

#: source and destination together, as the keys of the route and lease tables
IPV4_SRC_DST = struct.Struct("4s4s")
IPV6_SRC_DST = struct.Struct("16s16s")


def shifted(field: slice, by: int) -> slice:
    """``field`` of a packet that starts ``by`` bytes into a buffer (after a vnet header)."""
    return slice(field.start + by, field.stop + by)
