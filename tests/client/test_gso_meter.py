"""A hostile server's super-packets must not inflate the client's byte meter.

Once one VPN_RECV_GSO with a segment size of 1 and 60,040 bytes counted as 2.46 MB (60,000
segments, counted before any check and without offload agreed), and the next receipt was
signed after about 60 kB of real traffic.
"""

from __future__ import annotations

from cellvpn.client.stream import MIN_COUNTED_GSO, gso_counted
from cellvpn.device import vnet
from cellvpn.wire import vpn
from cellvpn.wire.channel import CHANNEL_S
from tests.fuzz import inputs
from tests.fuzz import test_client_stream as harness

SRC, DST = bytes([198, 19, 0, 10]), harness.CLIENT


def super_packet(payload: int, gso_size: int) -> tuple[bytes, bytes]:
    seg = inputs.tcp(SRC, DST, payload=bytes(payload), partial=True)
    pkt = inputs.ipv4(SRC, DST, 6, seg)
    return vnet.HEADER.pack(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 40, gso_size, 20, 16), pkt


def test_counted_rows() -> None:
    rows = []
    for payload, gso in [(60000, 1), (2000, 100), (60000, 1360), (1360 * 40, 1360)]:
        header, pkt = super_packet(payload, gso)
        rows.append((payload, gso, gso_counted(memoryview(header), memoryview(pkt))))
    assert rows == [
        (60000, 1, None),  # 60,000 segments: not a header the tunnel would write
        (2000, 100, (1, 2040)),  # under MIN_COUNTED_GSO: counted as what came
        (60000, 1360, (45, 60040 + 44 * 40)),
        (54400, 1360, (40, 54440 + 39 * 40)),
    ]
    assert MIN_COUNTED_GSO == 536


def test_super_packets_count_only_with_offload_agreed_and_a_sound_header() -> None:
    server = harness.Server(True, frozenset(), False)  # a paying client that did not offer it
    server.welcome(5, harness.ORDER.encode(), frozenset())
    server.ask(1_000_000, 60, "deposit")
    server.success()
    header, pkt = super_packet(60000, 1)
    body = inputs.vpn_header(vpn.OpCode.VPN_RECV_GSO, header + pkt)
    server.send([(CHANNEL_S, vpn.PKT_TYPE_DATA, body)], [], [])
    assert server.stream.received_bytes == 0 and server.stream.dropped_bad_offload == 1
    server.ask(1_000_000, 60, "last")
    assert server.billing.receipts_signed == 1  # the next receipt is not signed early
