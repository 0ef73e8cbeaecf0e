"""The IP field offsets the data path reads, against packets built field by field."""

from __future__ import annotations

import socket
import struct

from cellvpn.device import vnet
from cellvpn.wire import ip


def test_ipv4_fields_sit_where_the_forwarder_reads_them() -> None:
    src, dst = socket.inet_aton("198.18.5.2"), socket.inet_aton("198.19.0.10")
    pkt = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 1400, 0, 0, 64, 6, 0, src, dst)
    assert pkt[ip.VERSION] == ip.IPV4_PLAIN_FIRST_BYTE
    assert pkt[ip.IPV4_TOTAL_LENGTH] << 8 | pkt[ip.IPV4_TOTAL_LENGTH + 1] == 1400
    assert pkt[ip.IPV4_PROTOCOL] == ip.TCP
    assert (pkt[ip.IPV4_SRC], pkt[ip.IPV4_DST]) == (src, dst)
    assert ip.IPV4_SRC_DST.unpack_from(pkt, ip.IPV4_ADDRESSES) == (src, dst)
    assert len(pkt) == ip.IPV4_HEADER


def test_ipv6_fields_sit_where_the_forwarder_reads_them() -> None:
    src = socket.inet_pton(socket.AF_INET6, "2001:db8:1::2")
    dst = socket.inet_pton(socket.AF_INET6, "2001:db8:5::10")
    pkt = struct.pack("!IHBB16s16s", 0x60000000, 1360, 6, 64, src, dst)
    assert pkt[ip.IPV6_PAYLOAD_LENGTH] << 8 | pkt[ip.IPV6_PAYLOAD_LENGTH + 1] == 1360
    assert pkt[ip.IPV6_NEXT_HEADER] == ip.TCP
    assert (pkt[ip.IPV6_SRC], pkt[ip.IPV6_DST]) == (src, dst)
    assert ip.IPV6_SRC_DST.unpack_from(pkt, ip.IPV6_ADDRESSES) == (src, dst)
    assert len(pkt) == ip.IPV6_HEADER


def test_a_field_shifted_past_the_vnet_header() -> None:
    assert ip.shifted(ip.IPV4_DST, vnet.SIZE) == slice(26, 30)
    assert ip.shifted(ip.IPV6_DST, vnet.SIZE) == slice(34, 50)
