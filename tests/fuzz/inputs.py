"""Structure-aware hostile inputs: IPv4 packets, offload headers, channel packets, frame runs.

Arbitrary bytes stop at a decoder's first length check; inputs built from the real layouts
(then damaged) get past it and reach the code behind. Every strategy here builds valid
values first and lets a few of them be flipped, cut, duplicated or lie about a length. The
wire values themselves come from ``tests.wire.strategies`` and its ``mutated``.
"""

from __future__ import annotations

import functools
import itertools
import random
import struct
from collections.abc import Sequence
from typing import TypeVar

from hypothesis import strategies as st

from cellvpn.billing.records import DepositRequest, SignedDeposit
from cellvpn.device import vnet
from cellvpn.stream import caps
from cellvpn.wire import vpn
from cellvpn.wire.channel import CHANNEL_R, CHANNEL_S, encode_channel_packet
from cellvpn.wire.frame import FrameType, encode_frame
from cellvpn.wire.receipt import UINT256_MAX
from cellvpn.wire.service import CheckPacket, PacketType
from cellvpn.wire.setup import PROTOCOL_VERSION, Close, CloseCode, Hello, Welcome
from tests.wire import strategies as s
from tests.wire.test_fuzz import ENCODINGS, mutated

u8, u16, u32, u64 = s.u8, s.u16, s.u32, s.u64
ANY_ADDRESS = st.binary(min_size=4, max_size=4)
T = TypeVar("T")


def usually(good: st.SearchStrategy[T], odd: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """``good`` seven times in eight, else ``odd`` (``one_of`` would favour the larger space)."""
    return st.integers(0, 7).flatmap(lambda pick: odd if pick == 5 else good)


def sized_lists(items: st.SearchStrategy[T], low: int, high: int) -> st.SearchStrategy[list[T]]:
    """Lists of ``low`` to ``high`` items, every length about as likely (``st.lists`` favours
    short ones, and a script of one step reaches little)."""
    return st.integers(low, high).flatmap(lambda n: st.lists(items, min_size=n, max_size=n))


_DAMAGE_COUNT = st.integers(1, 3)
_DAMAGE_KIND = st.sampled_from(["flip", "cut", "insert", "append", "truncate"])
_DAMAGE_AT = st.integers(0, 2**16)
_DAMAGE_BYTES = st.binary(min_size=1, max_size=8)


def damage(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few bytes flipped, cut, inserted or appended, or cut off: the wire
    fuzzer's ``mutated``, for bytes made inside a draw (no strategy built per call)."""
    out = bytearray(data)
    for _ in range(draw(_DAMAGE_COUNT)):
        kind, at = draw(_DAMAGE_KIND), draw(_DAMAGE_AT) % (len(out) + 1)
        if kind == "flip" and at < len(out):
            out[at] ^= draw(_DAMAGE_BYTES)[0] or 0xFF
        elif kind == "cut":
            del out[at : at + len(draw(_DAMAGE_BYTES))]
        elif kind == "insert":
            out[at:at] = draw(_DAMAGE_BYTES)
        elif kind == "append":
            out += draw(_DAMAGE_BYTES)
        else:
            del out[at:]
    return bytes(out)


# --- IPv4 ---------------------------------------------------------------------------------


def ip_header_checksum(header: bytes | bytearray) -> int:
    scratch = bytearray(header)
    scratch[10:12] = b"\0\0"
    return vnet.checksum(scratch)


def tcp_checksum(src: bytes, dst: bytes, segment: bytes | bytearray) -> int:
    """The complete TCP checksum of ``segment`` (its checksum field taken as zero)."""
    scratch = bytearray(segment)
    scratch[16:18] = b"\0\0"
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(scratch))
    return vnet.checksum(pseudo + bytes(scratch))


def ipv4(
    src: bytes,
    dst: bytes,
    proto: int,
    body: bytes,
    *,
    options: bytes = b"",
    tos: int = 0,
    ident: int = 1,
    frag: int = 0x4000,
    ttl: int = 64,
) -> bytes:
    """An IPv4 packet with a right total length and header checksum."""
    options += b"\0" * (-len(options) % 4)
    ihl = 5 + len(options) // 4
    total = ihl * 4 + len(body)
    head = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, total, ident, frag, ttl, proto, 0, src, dst)
    )
    head += options
    struct.pack_into("!H", head, 10, ip_header_checksum(head))
    return bytes(head) + body


def tcp(
    src: bytes,
    dst: bytes,
    *,
    sport: int = 40000,
    dport: int = 443,
    seq: int = 1000,
    ack: int = 1,
    flags: int = 0x10,
    window: int = 512,
    options: bytes = b"",
    payload: bytes = b"",
    partial: bool = False,
) -> bytes:
    """A TCP segment; its checksum complete, or (``partial``) the pseudo-header sum a TSO
    read leaves for the device."""
    options += b"\x01" * (-len(options) % 4)
    doff = 5 + len(options) // 4
    seg = bytearray(
        struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, window, 0, 0)
    )
    seg += options + payload
    if partial:
        pseudo = (int.from_bytes(src + dst, "big") + 6 + len(seg)) % 0xFFFF
        struct.pack_into("!H", seg, 16, pseudo or 0xFFFF)
    else:
        struct.pack_into("!H", seg, 16, tcp_checksum(src, dst, seg))
    return bytes(seg)


def filler(seed: int, size: int) -> bytes:
    """``size`` cheap pseudo-random bytes (drawing a 60 KiB binary would be slow)."""
    return random.Random(seed).randbytes(size)


tcp_option = st.one_of(
    st.just(b"\x01"),  # NOP
    st.builds(lambda v: b"\x02\x04" + v.to_bytes(2, "big"), u16),  # MSS
    st.builds(lambda v: b"\x03\x03" + bytes([v]), st.integers(0, 14)),  # window scale
    st.just(b"\x04\x02"),  # SACK permitted
    st.builds(lambda ts: b"\x08\x0a" + ts, st.binary(min_size=8, max_size=8)),  # timestamps
    st.just(b"\x00"),  # end of list
    st.binary(min_size=1, max_size=6),  # anything, often malformed
)
tcp_options = st.lists(tcp_option, max_size=6).map(b"".join).filter(lambda o: len(o) <= 40)
ip_options = st.sampled_from([b"", b"\x01" * 4, b"\x83\x07\x04" + bytes(5), b"\x94\x04\0\0"])
tcp_flags = st.one_of(st.sampled_from([0x10, 0x18, 0x02, 0x12, 0x11, 0x19, 0x04, 0x90]), u8)
frag_field = st.sampled_from([0x4000, 0x0000, 0x2000, 0x0001, 0x2001, 0x4000 | 0x1FFF])
#: mostly Don't Fragment (what TCP sends), now and then a fragment
usual_frag = st.one_of(st.just(0x4000), st.just(0x4000), st.just(0x0000), frag_field)


_IP_KINDS = st.sampled_from(["tcp", "tcp", "udp", "icmp", "other"])
_PAYLOADS = st.binary(max_size=64)
_BOOLS = st.booleans()
_ICMP_TYPES = st.sampled_from([8, 0, 3, 11])
_QUARTER = st.integers(0, 3)
_FIFTH = st.integers(0, 4)


@functools.cache
@st.composite
def ip_packets(
    draw: st.DrawFn,
    sources: st.SearchStrategy[bytes],
    destinations: st.SearchStrategy[bytes] | None = None,
) -> bytes:
    """An IPv4 packet from one of ``sources`` (to one of ``destinations``, or anywhere): TCP
    (often SYN, with options), UDP, ICMP or another protocol; sometimes with IP options, a
    fragment, or then damaged."""
    src = draw(sources)
    dst = draw(destinations if destinations is not None else st.one_of(sources, ANY_ADDRESS))
    kind = draw(_IP_KINDS)
    payload = draw(_PAYLOADS)
    if kind == "tcp":
        proto = 6
        body = tcp(
            src,
            dst,
            sport=draw(u16),
            dport=draw(u16),
            seq=draw(u32),
            flags=draw(tcp_flags),
            options=draw(tcp_options),
            payload=payload,
            partial=draw(_BOOLS),
        )
    elif kind == "udp":
        proto = 17
        body = struct.pack("!HHHH", draw(u16), draw(u16), 8 + len(payload), 0) + payload
    elif kind == "icmp":
        proto = 1
        body = bytes([draw(_ICMP_TYPES), 0]) + bytes(6) + payload
    else:
        proto = draw(u8)
        body = payload
    pkt = ipv4(
        src,
        dst,
        proto,
        body,
        options=draw(ip_options),
        tos=draw(u8),
        ident=draw(u16),
        frag=draw(usual_frag),
    )
    if draw(_QUARTER) == 0:
        pkt = damage(draw, pkt)
    return pkt


_SUPER_SIZES = st.one_of(st.integers(0, 3000), st.integers(0, 65535 - 20 - 60))
_SUPER_OPTIONS = st.one_of(st.just(b"\x01\x01\x08\x0a" + bytes(8)), tcp_options)
_MSS_KINDS = st.sampled_from(["fits", "fits", "any"])
_MSS_ABOVE = st.one_of(st.integers(0, 1460), st.integers(0, 65535))
_HEADER_KINDS = st.sampled_from(["gso", "gso", "gso-ecn", "csum", "plain", "any"])
_ANY_HEADER = st.binary(min_size=10, max_size=10)


@functools.cache
@st.composite
def super_packets(
    draw: st.DrawFn,
    sources: st.SearchStrategy[bytes],
    destinations: st.SearchStrategy[bytes] | None = None,
) -> tuple[bytes, bytes]:
    """(vnet header, packet): a TSO read (a TCP super-packet, up to 64 KiB) or a checksum
    offload, with a header that is right, a little wrong, or anything."""
    src, dst = draw(sources), draw(destinations if destinations is not None else ANY_ADDRESS)
    size = draw(_SUPER_SIZES)
    options = draw(_SUPER_OPTIONS)
    segment = tcp(
        src,
        dst,
        seq=draw(u32),
        flags=draw(tcp_flags),
        options=options,
        payload=filler(draw(u32), size),
        partial=True,
    )
    pkt = ipv4(src, dst, 6, segment, ident=draw(u16), frag=draw(usual_frag))
    hdrs = 20 + (segment[12] >> 4) * 4
    fits = max(1, -(-(len(pkt) - hdrs) // 64))  # at most 64 segments
    how = draw(_MSS_KINDS)
    mss = draw(u16) if how == "any" else min(65535, fits + draw(_MSS_ABOVE))
    kind = draw(_HEADER_KINDS)
    if kind == "gso":
        header = vnet.HEADER.pack(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, hdrs, mss, 20, 16)
    elif kind == "gso-ecn":
        header = vnet.HEADER.pack(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4 | vnet.GSO_ECN, 0, mss, 0, 0)
    elif kind == "csum":
        header = vnet.HEADER.pack(vnet.F_NEEDS_CSUM, vnet.GSO_NONE, 0, 0, 20, 16)
    elif kind == "plain":
        header = vnet.PLAIN
    else:
        header = draw(_ANY_HEADER)
    if draw(_FIFTH) == 0:
        header = damage(draw, header)
    if draw(_FIFTH) == 0:
        pkt = damage(draw, pkt)
    return header, pkt


_UDP_PAYLOADS = st.binary(max_size=200)


@functools.cache
@st.composite
def udp_checksum_offloads(
    draw: st.DrawFn,
    sources: st.SearchStrategy[bytes],
    destinations: st.SearchStrategy[bytes] | None = None,
) -> tuple[bytes, bytes]:
    """(vnet header, packet): a UDP datagram whose checksum is left to the device."""
    src, dst = draw(sources), draw(destinations if destinations is not None else ANY_ADDRESS)
    payload = draw(_UDP_PAYLOADS)
    pseudo = (int.from_bytes(src + dst, "big") + 17 + 8 + len(payload)) % 0xFFFF
    body = struct.pack("!HHHH", draw(u16), draw(u16), 8 + len(payload), pseudo) + payload
    pkt = ipv4(src, dst, 17, body, frag=draw(usual_frag))
    header = vnet.HEADER.pack(vnet.F_NEEDS_CSUM, vnet.GSO_NONE, 0, 0, 20, 6)
    if draw(_BOOLS):
        header = damage(draw, header)
    return header, pkt


@functools.cache
def offloaded(
    sources: st.SearchStrategy[bytes], destinations: st.SearchStrategy[bytes] | None = None
) -> st.SearchStrategy[tuple[bytes, bytes]]:
    """A vnet header and its packet, of every kind a peer with offload may send."""
    anything = st.tuples(st.binary(min_size=10, max_size=10), st.binary(max_size=200))
    plain = ip_packets(sources, destinations).map(lambda p: (vnet.PLAIN, p))
    return st.one_of(
        super_packets(sources, destinations),
        udp_checksum_offloads(sources, destinations),
        plain,
        anything,
    )


@functools.cache
@st.composite
def tcp_flows(draw: st.DrawFn, sources: st.SearchStrategy[bytes]) -> list[bytes]:
    """A batch as a client without offload sends it: runs of segments of one TCP flow
    (contiguous, MSS-sized) with other packets between, and a few fields changed."""
    src, dst = draw(sources), draw(st.binary(min_size=4, max_size=4))
    out: list[bytes] = []
    for _ in range(draw(st.integers(1, 3))):
        mss = draw(st.integers(1, 1460))
        seq = draw(u32)
        sport = draw(st.sampled_from([40000, 40001]))
        options = draw(st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(8)]))
        count = draw(st.integers(1, 70))
        last = draw(st.integers(1, mss))
        seed = draw(u32)
        for i in range(count):
            size = last if i == count - 1 else mss
            flags = 0x18 if i == count - 1 and draw(st.booleans()) else 0x10
            segment = tcp(
                src,
                dst,
                sport=sport,
                seq=seq,
                flags=flags,
                options=options,
                payload=filler(seed + i, size),
            )
            out.append(ipv4(src, dst, 6, segment, ident=i))
            seq = (seq + size) & 0xFFFFFFFF
        out.extend(draw(st.lists(ip_packets(sources), max_size=2)))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(out) - 1))
        how = draw(st.sampled_from(["mutate", "duplicate", "drop", "swap"]))
        if how == "mutate":
            out[at] = damage(draw, out[at])
        elif how == "duplicate":
            out.insert(at, out[at])
        elif how == "drop" and len(out) > 1:
            del out[at]
        elif how == "swap":
            other = draw(st.integers(0, len(out) - 1))
            out[at], out[other] = out[other], out[at]
    return out


# --- 'R' and 'S' channel packets -------------------------------------------------------------

sig64 = st.binary(min_size=64, max_size=64)
signed_deposits = st.builds(
    lambda owner, unit, price, value, expires, nonce, sig: SignedDeposit(
        DepositRequest(owner, unit, price, value, expires, nonce), sig
    ).encode(),
    st.binary(min_size=32, max_size=32),
    st.sampled_from([0x02, 0x11, 0]),
    st.integers(0, UINT256_MAX),
    st.integers(0, UINT256_MAX),
    u64,
    st.binary(min_size=16, max_size=16),
    sig64,
)


def _maybe_mutated(values: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(values, values, mutated(values))


r_types = st.one_of(st.sampled_from(sorted(PacketType)), u8)
r_bodies = _maybe_mutated(
    st.one_of(
        ENCODINGS["request"],
        ENCODINGS["check"],
        ENCODINGS["success"],
        ENCODINGS["error"],
        ENCODINGS["receipt"],
        s.notifies.map(lambda n: n.encode()),
        signed_deposits,
        st.binary(max_size=300),
    )
)


@functools.cache
@st.composite
def check_requests(draw: st.DrawFn) -> bytes:
    """CHECK_REQUESTs as a client sends them: data with its hash, a size to send back."""
    data = draw(st.binary(max_size=300))
    digest = CheckPacket.hash_of(data) if draw(st.integers(0, 4)) else draw(s.hash32)
    asked = draw(st.one_of(st.integers(0, 12000), u64))
    return CheckPacket(data_size_recv=asked, data_hash=digest, data=data).encode()


#: 'R' packets a client sends, each type with a body of its own layout
to_server_r = st.one_of(
    st.tuples(st.just(PacketType.REQUEST), ENCODINGS["request"]),
    st.tuples(st.just(PacketType.CHECK_REQUEST), check_requests()),
    st.tuples(st.just(PacketType.SIGN_RESPONSE), ENCODINGS["receipt"]),
    st.tuples(st.just(PacketType.DEPOSIT_CREATE), signed_deposits),
    st.tuples(st.just(PacketType.ERROR), ENCODINGS["error"]),
)
#: 'R' packets a server sends, each type with a body of its own layout
to_client_r = st.one_of(
    st.tuples(st.just(PacketType.SUCCESS), ENCODINGS["success"]),
    st.tuples(st.just(PacketType.ERROR), ENCODINGS["error"]),
    st.tuples(st.just(PacketType.SIGN_REQUEST), ENCODINGS["receipt"]),
    st.tuples(st.just(PacketType.DEPOSIT_CREATED), st.binary(min_size=30, max_size=34)),
    st.tuples(st.just(PacketType.NOTIFY_STOPPED), s.notifies.map(lambda n: n.encode())),
    st.tuples(st.just(PacketType.CHECK_RESPONSE), ENCODINGS["check"]),
)


@functools.cache
def r_packets(to_client: bool) -> st.SearchStrategy[tuple[int, bytes]]:
    """'R' packets as (type, body): mostly a type with its own layout (now and then
    damaged), else any type with any layout, so a body meets the wrong type."""
    matched = to_client_r if to_client else to_server_r
    return usually(st.one_of(matched, matched, _damaged(matched)), st.tuples(r_types, r_bodies))


@functools.cache
@st.composite
def _damaged(draw: st.DrawFn, packets: st.SearchStrategy[tuple[int, bytes]]) -> tuple[int, bytes]:
    ptype, body = draw(packets)
    return ptype, damage(draw, body)


#: CONNECT hosts: public and private literals, a name (resolved by the test's resolver),
#: nothing, and what is not ASCII
HOSTS = [
    b"93.184.215.14",
    b"example.org",
    b"10.0.0.1",  # no traffic: the fuzzed server runs on a memory reactor
    b"198.18.9.1",
    b"[::1]",
    b"",
    b"\xff",
]
#: the L4 proxy's ops each way
PROXY_TO_SERVER = [vpn.OpCode.CONNECT, vpn.OpCode.CONNECT, vpn.OpCode.SEND, vpn.OpCode.DISCONNECT]
PROXY_TO_CLIENT = [vpn.OpCode.CONNECTED, vpn.OpCode.RECV, vpn.OpCode.DISCONNECT, vpn.OpCode.PROBLEM]
op_codes = st.one_of(st.sampled_from(sorted(vpn.OpCode)), u32)


def vpn_header(
    op: int, data: bytes, sock_id: int = 0, usage: int = 0, size: int | None = None
) -> bytes:
    """An 'S' packet with a data-layout header (``size`` may lie about ``data``)."""
    n = len(data) if size is None else size
    return struct.pack("<iIIIxxxx", sock_id, op, usage, n & 0xFFFFFFFF) + data


_S_TYPES = st.sampled_from([vpn.PKT_TYPE_DATA, vpn.PKT_TYPE_CLIENT, vpn.PKT_TYPE_PONG])
_S_KINDS = st.sampled_from(
    ["ip", "ip", "ip", "gso", "gso", "addr", "ping", "proxy", "problem", "encoded", "raw"]
)
_SOCK_IDS = st.one_of(st.just(0), st.integers(1, 4), s.i32)
_ADDR_REPLIES = st.one_of(ENCODINGS["addr"], ENCODINGS["addr"], mutated(ENCODINGS["addr"]))
_PINGS = st.sampled_from([vpn.OpCode.PING, vpn.OpCode.PONG])
_PROXY_OPS_TO_CLIENT = usually(
    st.sampled_from(PROXY_TO_CLIENT), st.sampled_from(sorted(vpn.LAYOUTS))
)
_PROXY_OPS_TO_SERVER = usually(
    st.sampled_from(PROXY_TO_SERVER), st.sampled_from(sorted(vpn.LAYOUTS))
)
_HOSTS = st.sampled_from(HOSTS)
_PROXY_DATA = st.binary(max_size=64)
#: a socket of the first few (mostly), or 0: the packet's own sock_id
_PROXY_SOCK_IDS = usually(st.integers(1, 4), st.just(0))
_PORTS = usually(st.sampled_from([80, 443, 8443]), u16)
_PROBLEMS = st.one_of(st.sampled_from(sorted(vpn.ProblemCode)), u32)
_LIES = st.none() | u32
_RAW_DATA = st.binary(max_size=80)
_SIXTH = st.integers(0, 5)


@functools.cache
@st.composite
def s_packets(
    draw: st.DrawFn,
    sources: st.SearchStrategy[bytes],
    to_client: bool,
    destinations: st.SearchStrategy[bytes] | None = None,
) -> tuple[int, bytes]:
    """'S' packets as (channel packet type, body): IP packets, super-packets, address
    requests and replies, PING/PONG, the L4 proxy's ops, in whichever direction."""
    ptype = draw(_S_TYPES)
    send = vpn.OpCode.VPN_RECV if to_client else vpn.OpCode.VPN_SEND
    send_gso = vpn.OpCode.VPN_RECV_GSO if to_client else vpn.OpCode.VPN_SEND_GSO
    kind = draw(_S_KINDS)
    sock_id = draw(_SOCK_IDS)
    if kind == "ip":
        body = vpn_header(send, draw(ip_packets(sources, destinations)), sock_id)
    elif kind == "gso":
        header, pkt = draw(offloaded(sources, destinations))
        body = vpn_header(send_gso, header + pkt, sock_id)
    elif kind == "addr":
        if to_client:
            reply = draw(_ADDR_REPLIES)
            body = vpn_header(vpn.OpCode.VPN_ADDR_REPLY, reply, sock_id)
        else:
            body = vpn_header(vpn.OpCode.VPN_ADDR_REQUEST, b"", sock_id)
    elif kind == "ping":
        body = vpn_header(draw(_PINGS), b"", sock_id)
    elif kind == "proxy":
        op = draw(_PROXY_OPS_TO_CLIENT if to_client else _PROXY_OPS_TO_SERVER)
        host = draw(_HOSTS)
        data = host if op in (vpn.OpCode.CONNECT, vpn.OpCode.CONNECTED) else draw(_PROXY_DATA)
        sock_id = draw(_PROXY_SOCK_IDS) or sock_id
        port = draw(_PORTS)
        packet = vpn.VpnPacket(op, data, sock_id, port=port, code=draw(u32), raw=draw(u64))
        body = packet.encode()
    elif kind == "problem":
        code = draw(_PROBLEMS)
        body = vpn.VpnPacket(vpn.OpCode.PROBLEM, sock_id=sock_id, code=code).encode()
    elif kind == "encoded":
        body = draw(ENCODINGS["vpn"])
    else:
        lie = draw(_LIES)
        body = vpn_header(draw(op_codes), draw(_RAW_DATA), sock_id, size=lie)
    if draw(_SIXTH) == 0:
        body = damage(draw, body)
    return ptype, body


# --- frames ------------------------------------------------------------------------------------

#: Where a hostile run's sequence numbers start: past whatever the setup used, so its packets
#: are accepted (and its replays are replays of its own).
SEQ_BASE = 1000


def hellos_for_server() -> st.SearchStrategy[Hello]:
    """HELLOs a server accepts (mostly), and some it refuses."""
    good = st.builds(
        Hello,
        version=st.just(PROTOCOL_VERSION),
        channels=st.sampled_from(["RS", "RS", "SR", "R", "S"]),
        caps=st.frozensets(st.sampled_from(sorted(caps.KNOWN))),
        max_frame=st.sampled_from([0, 1500, 256 * 1024]),
        resume_token=st.one_of(st.just(b""), st.binary(min_size=16, max_size=16)),
        node_addr=u64,
    )
    return usually(good, s.hellos)


def welcomes_for_client(channels: str, offered: frozenset[str]) -> st.SearchStrategy[Welcome]:
    """WELCOMEs a client with these settings accepts (mostly), and some it refuses."""
    good = st.builds(
        Welcome,
        session_id=u32,
        version=st.just(PROTOCOL_VERSION),
        channels=st.just(channels),
        caps=st.frozensets(st.sampled_from(sorted(offered))) if offered else st.just(frozenset()),
        max_frame=st.sampled_from([0, 1500, 256 * 1024]),
        resume_token=st.binary(max_size=16),
        node_addr=u64,
        order=st.binary(max_size=8),
    )
    return usually(good, s.welcomes)


closes = st.one_of(
    st.builds(Close, st.sampled_from(sorted(CloseCode)), st.text(max_size=40)),
    s.closes,
)


@st.composite
def control_frames(draw: st.DrawFn) -> list[bytes]:
    """Frames other than channel data: keepalives (a burst of them too), CLOSE, a late HELLO
    or WELCOME, frame types nobody speaks, raw frames of the wire fuzzer."""
    kind = draw(
        st.sampled_from(
            ["keepalive", "alive", "burst", "close", "hello", "welcome", "other", "raw"]
        )
    )
    if kind == "keepalive":
        return [encode_frame(FrameType.KEEPALIVE)]
    if kind == "alive":
        return [encode_frame(FrameType.ALIVE)]
    if kind == "burst":
        return [encode_frame(FrameType.KEEPALIVE)] * draw(st.integers(2, 80))
    if kind == "close":
        body = draw(_maybe_mutated(closes.map(lambda c: c.encode())))
        return [encode_frame(FrameType.CLOSE, body)]
    if kind == "hello":
        return [encode_frame(FrameType.HELLO, draw(ENCODINGS["hello"]))]
    if kind == "welcome":
        return [encode_frame(FrameType.WELCOME, draw(ENCODINGS["welcome"]))]
    if kind == "other":
        ftype = draw(st.one_of(st.sampled_from([0x01, 0xFF, 0x23, 0x10]), u8))
        return [encode_frame(ftype, draw(st.binary(max_size=40)))]
    return [draw(ENCODINGS["frame"])]


@functools.cache
@st.composite
def frame_runs(
    draw: st.DrawFn, channel_packets: st.SearchStrategy[tuple[int, int, bytes]]
) -> list[bytes]:
    """Whole frames: channel packets (numbered on from ``SEQ_BASE``, now and then replayed,
    skipped ahead or sized wrong) among control frames; then duplicated, dropped, swapped."""
    frames: list[bytes] = []
    seq = SEQ_BASE
    for _ in range(draw(st.integers(0, 12))):
        if draw(st.integers(0, 4)) == 0:
            frames.extend(draw(control_frames()))
            continue
        cid, ptype, data = draw(channel_packets)
        how = draw(st.sampled_from(["next"] * 8 + ["replay", "jump", "short", "lies"]))
        if how == "replay":
            number = draw(st.integers(0, seq))
        elif how == "jump":
            number = draw(st.integers(seq, 2**64 - 1))
        else:
            number = seq
        seq = min(max(seq, number) + 1, 2**64 - 1)
        packet = encode_channel_packet(cid, ptype, number, data)
        if how == "short":
            packet = packet[: draw(st.integers(0, 15))]
        elif how == "lies":
            packet = packet[:12] + struct.pack("<I", draw(u32)) + packet[16:]
        frames.append(encode_frame(FrameType.DATA, packet))
    for _ in range(draw(st.integers(0, 2))):
        if not frames:
            break
        at = draw(st.integers(0, len(frames) - 1))
        how = draw(st.sampled_from(["duplicate", "drop", "swap", "truncate"]))
        if how == "duplicate":
            frames.insert(at, frames[at])
        elif how == "drop":
            del frames[at]
        elif how == "swap":
            other = draw(st.integers(0, len(frames) - 1))
            frames[at], frames[other] = frames[other], frames[at]
        else:
            frames[at] = frames[at][: draw(st.integers(0, len(frames[at])))]
    return frames


_RAW_READS = st.lists(st.binary(max_size=200), max_size=8)


@functools.cache
@st.composite
def hostile_stream(
    draw: st.DrawFn, channel_packets: st.SearchStrategy[tuple[int, int, bytes]]
) -> list[bytes]:
    """What a hostile peer sends after a valid setup, in the slices it arrives in: arbitrary
    bytes, or a run of frames (damaged now and then at the byte level), cut anywhere."""
    if draw(_QUARTER) == 0:
        return draw(_RAW_READS)
    joined = b"".join(draw(frame_runs(channel_packets)))
    if draw(_QUARTER) == 0:
        joined = damage(draw, joined)
    return split_at(joined, draw(cuts)) or [b""]


@functools.cache
def any_channel_packets() -> st.SearchStrategy[tuple[int, int, bytes]]:
    """Channel packets on 'R', 'S' or a channel nobody opened, with any data."""
    cid = usually(st.sampled_from([CHANNEL_R, CHANNEL_S]), u8)
    return st.tuples(cid, u8, st.binary(max_size=100))


@functools.cache
def session_packets(
    sources: st.SearchStrategy[bytes],
    to_client: bool,
    destinations: st.SearchStrategy[bytes] | None = None,
) -> st.SearchStrategy[tuple[int, int, bytes]]:
    """Channel packets a session's peer could send: mostly structure-aware 'S' ones, now and
    then (one in sixteen) 'R' ones, which often end a session, and one in 32 on a channel
    nobody opened."""
    r = r_packets(to_client).map(lambda p: (CHANNEL_R, p[0], p[1]))
    s_ = s_packets(sources, to_client, destinations).map(lambda p: (CHANNEL_S, p[0], p[1]))
    stray = st.tuples(
        u8.filter(lambda c: c not in (CHANNEL_R, CHANNEL_S)), u8, st.binary(max_size=40)
    )

    def pick(n: int) -> st.SearchStrategy[tuple[int, int, bytes]]:
        # not 0 (where hypothesis draws often and shrinks to) for the rarer kinds
        return stray if n == 7 else r if n in (3, 19) else s_

    return st.integers(0, 31).flatmap(pick)


def addresses(known: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    """One of ``known`` (seven times in eight), or any address."""
    return usually(st.sampled_from(list(known)), st.binary(min_size=4, max_size=4))


# --- damage decided at draw time, applied to bytes made at run time --------------------------

#: One edit: (what, where, bytes). ``where`` is taken modulo the length when applied, so an
#: edit drawn before the bytes exist (frames carry the clock and sequence numbers) still lands.
Edit = tuple[str, int, bytes]

#: Edits, or (seven times in eight) none: most reads stay whole, or the first damaged frame
#: would end every session before its packets are looked at.
edits: st.SearchStrategy[list[Edit]] = usually(
    st.just([]),
    st.lists(
        st.tuples(
            st.sampled_from(["flip", "cut", "insert", "truncate", "duplicate"]),
            st.integers(0, 2**16),
            st.binary(min_size=1, max_size=8),
        ),
        min_size=1,
        max_size=3,
    ),
)


def apply_edits(data: bytes, changes: Sequence[Edit]) -> bytes:
    """``data`` with bytes flipped, cut, inserted, cut off, or a stretch repeated."""
    out = bytearray(data)
    for what, where, value in changes:
        at = where % (len(out) + 1)
        if what == "flip" and at < len(out):
            out[at] ^= value[0] or 0xFF
        elif what == "cut":
            del out[at : at + len(value)]
        elif what == "insert":
            out[at:at] = value
        elif what == "truncate":
            del out[at:]
        elif what == "duplicate":
            out[at:at] = out[at : at + 64 * len(value)]
    return bytes(out)


#: Where to cut a read into slices, as for edits taken modulo the length.
cuts = st.lists(st.integers(0, 2**16), max_size=6)


def split_at(data: bytes, points: Sequence[int]) -> list[bytes]:
    """``data`` in the slices ``points`` (modulo its length) cut it into; never empty."""
    if not data:
        return []
    marks = sorted({p % len(data) for p in points} - {0})
    edges = [0, *marks, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]
