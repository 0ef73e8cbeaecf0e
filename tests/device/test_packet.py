"""IPv4 packet helpers: addresses, the well-formedness check and MSS clamping."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellvpn.device.packet import clamp_mss, ipv4_dst, ipv4_src, is_ipv4, mss_for_mtu

SRC = IPv4Address("198.18.0.2").packed
DST = IPv4Address("192.0.2.10").packed
SYN, ACK, FIN = 0x02, 0x10, 0x01
NOP = b"\x01"


# --- a tiny packet builder, with checksums computed from scratch -----------------------------


def ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def inet_checksum(data: bytes) -> int:
    return ~ones_sum(data) & 0xFFFF


def mss(value: int) -> bytes:
    return struct.pack("!BBH", 2, 4, value)


def tcp_checksum(pkt: bytes) -> int:
    """The TCP checksum of ``pkt`` recomputed over pseudo-header and segment, field zeroed."""
    ihl = (pkt[0] & 0x0F) * 4
    total = struct.unpack_from("!H", pkt, 2)[0]
    segment = bytearray(pkt[ihl:total])
    segment[16:18] = b"\x00\x00"
    pseudo = pkt[12:20] + struct.pack("!BBH", 0, pkt[9], len(segment))
    return inet_checksum(pseudo + bytes(segment))


def stored_tcp_checksum(pkt: bytes) -> int:
    ihl = (pkt[0] & 0x0F) * 4
    return int(struct.unpack_from("!H", pkt, ihl + 16)[0])


def checksum_ok(pkt: bytes) -> bool:
    return stored_tcp_checksum(pkt) == tcp_checksum(pkt)


def build(
    flags: int = SYN,
    options: bytes = mss(1460),
    *,
    ip_options: bytes = b"",
    payload: bytes = b"",
    frag: int = 0,
    proto: int = 6,
) -> bytes:
    """An IPv4 TCP segment with valid IP and TCP checksums."""
    if len(options) % 4:
        options += b"\x00" * (4 - len(options) % 4)
    assert len(options) % 4 == 0 and len(ip_options) % 4 == 0
    tcp = bytearray(
        struct.pack(
            "!HHIIBBHHH",
            40000,
            443,
            0x01020304,
            0 if not flags & ACK else 0x0A0B0C0D,
            ((20 + len(options)) // 4) << 4,
            flags,
            64240,
            0,
            0,
        )
        + options
        + payload
    )
    ihl = 20 + len(ip_options)
    total = ihl + len(tcp)
    ip = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s", 0x40 | ihl // 4, 0, total, 0x1234, frag, 64, proto, 0, SRC, DST
        )
        + ip_options
    )
    ip[10:12] = struct.pack("!H", inet_checksum(bytes(ip)))
    pseudo = SRC + DST + struct.pack("!BBH", 0, proto, len(tcp))
    tcp[16:18] = struct.pack("!H", inet_checksum(pseudo + bytes(tcp)))
    return bytes(ip + tcp)


def mss_values(pkt: bytes) -> list[int]:
    """Every MSS option value in ``pkt`` (options assumed well-formed)."""
    ihl = (pkt[0] & 0x0F) * 4
    end = ihl + (pkt[ihl + 12] >> 4) * 4
    i, out = ihl + 20, []
    while i < end and pkt[i] != 0:
        if pkt[i] == 1:
            i += 1
            continue
        if pkt[i] == 2:
            out.append(struct.unpack_from("!H", pkt, i + 2)[0])
        i += pkt[i + 1]
    return out


def test_builder_makes_valid_checksums() -> None:
    """The test's own builder is right, or nothing below means anything."""
    pkt = build(payload=b"abc")
    assert checksum_ok(pkt)
    assert inet_checksum(pkt[:20]) == 0
    assert ones_sum(pkt[12:20] + struct.pack("!BBH", 0, 6, len(pkt) - 20) + pkt[20:]) == 0xFFFF


# --- addresses and well-formedness -----------------------------------------------------------


def test_addresses_are_4_byte_slices_of_any_buffer() -> None:
    """Source and destination come back as bytes from bytes, bytearray or memoryview."""
    pkt = build()
    for buf in (pkt, bytearray(pkt), memoryview(pkt)):
        assert ipv4_src(buf) == SRC and type(ipv4_src(buf)) is bytes
        assert ipv4_dst(buf) == DST and type(ipv4_dst(buf)) is bytes


def test_is_ipv4_accepts_exactly_one_packet() -> None:
    """Version 4, IHL at least 5 and a total length equal to the buffer."""
    pkt = build()
    assert is_ipv4(pkt) and is_ipv4(memoryview(pkt)) and is_ipv4(bytearray(pkt))
    assert is_ipv4(build(ip_options=NOP * 4))
    assert not is_ipv4(pkt + b"\x00")
    assert not is_ipv4(pkt[:-1])
    assert not is_ipv4(pkt[:19])
    assert not is_ipv4(b"")
    assert not is_ipv4(bytes([0x60]) + pkt[1:])  # IPv6 version nibble
    assert not is_ipv4(bytes([0x44]) + pkt[1:])  # IHL 4
    short_total = bytearray(pkt)
    short_total[0] = 0x4F  # IHL 60 bytes, more than the total length of 44
    assert not is_ipv4(short_total)


def test_mss_for_mtu() -> None:
    """MSS = MTU less the 40 bytes of IPv4 and TCP headers; MTUs below 68 are refused."""
    assert mss_for_mtu(1500) == 1460
    assert mss_for_mtu(1400) == 1360
    assert mss_for_mtu(68) == 28
    with pytest.raises(ValueError):
        mss_for_mtu(67)


# --- clamping ---------------------------------------------------------------------------------


def assert_clamped(before: bytes, after: bytes | None, value: int) -> None:
    assert after is not None and type(after) is bytes
    assert len(after) == len(before)
    assert mss_values(after) == [value]
    assert checksum_ok(after)
    assert stored_tcp_checksum(after) == tcp_checksum(after)
    ihl = (before[0] & 0x0F) * 4
    changed = {i for i in range(len(before)) if before[i] != after[i]}
    assert changed <= {ihl + 16, ihl + 17} | set(range(ihl + 20, ihl + 20 + 40))
    assert after[:ihl] == before[:ihl]  # the IP header (and its checksum) is untouched


def test_syn_mss_is_lowered_and_the_checksum_verifies() -> None:
    """A SYN announcing 1460 through a 1400-byte tunnel is clamped to 1360."""
    pkt = build(SYN, mss(1460))
    assert_clamped(pkt, clamp_mss(pkt, 1360), 1360)


def test_syn_ack_is_clamped_too() -> None:
    """The server's answer gets clamped as well: both directions must fit."""
    pkt = build(SYN | ACK, mss(8960))
    assert_clamped(pkt, clamp_mss(pkt, 1360), 1360)


def test_typical_linux_syn_options() -> None:
    """MSS, SACK permitted, timestamps, NOP, window scale: only the MSS changes."""
    options = mss(65495) + b"\x04\x02" + b"\x08\x0a" + bytes(range(8)) + NOP + b"\x03\x03\x07"
    pkt = build(SYN, options)
    assert len(options) == 20
    assert_clamped(pkt, clamp_mss(pkt, 1360), 1360)


def test_mss_at_an_odd_offset() -> None:
    """An MSS option behind one NOP straddles checksum words; the update still verifies."""
    for options in (NOP + mss(1460) + NOP * 3, NOP * 3 + mss(1460) + NOP):
        pkt = build(SYN, options)
        assert_clamped(pkt, clamp_mss(pkt, 1200), 1200)


def test_odd_length_payload_and_many_values() -> None:
    """Checksums verify for odd payloads and MSS/limit pairs across the range."""
    for payload in (b"", b"x", b"fast open data!"):
        for old, limit in ((1461, 1460), (65535, 28), (0xFF01, 0x00FF), (0x0100, 0x00FF)):
            pkt = build(SYN, NOP + mss(old) + NOP * 3, payload=payload)
            assert_clamped(pkt, clamp_mss(pkt, limit), limit)
            pkt = build(SYN, mss(old), payload=payload)
            assert_clamped(pkt, clamp_mss(pkt, limit), limit)


def test_checksum_update_folds_its_carry_twice() -> None:
    """A swapped odd-offset update can carry twice: MSS 256 -> 255 with checksum 0xFEFE."""
    options = NOP + mss(256) + NOP * 3
    base = bytearray(build(SYN, options, payload=b"\x00\x00"))
    base[36:38] = b"\x00\x00"  # the TCP checksum field
    # Choose the payload word so that the segment's checksum comes out as 0xFEFE.
    rest = ones_sum(bytes(base[12:20]) + struct.pack("!BBH", 0, 6, len(base) - 20) + base[20:])
    word = (0x0101 - rest) % 0xFFFF
    pkt = build(SYN, options, payload=struct.pack("!H", word))
    assert stored_tcp_checksum(pkt) == 0xFEFE
    assert_clamped(pkt, clamp_mss(pkt, 255), 255)


def test_small_or_equal_mss_is_left_alone() -> None:
    """An MSS that already fits needs no copy."""
    assert clamp_mss(build(SYN, mss(1360)), 1360) is None
    assert clamp_mss(build(SYN, mss(536)), 1360) is None


def test_no_mss_option_is_left_alone() -> None:
    """A SYN without MSS option (the peer assumes 536) is not changed."""
    assert clamp_mss(build(SYN, b""), 1360) is None
    assert clamp_mss(build(SYN, NOP * 4), 1360) is None


def test_non_syn_segments_are_left_alone() -> None:
    """ACK, FIN or no flags: never clamped, even with an MSS-like option."""
    for flags in (ACK, FIN | ACK, 0):
        assert clamp_mss(build(flags, mss(1460)), 1360) is None


def test_non_tcp_is_left_alone() -> None:
    """UDP that happens to look like a SYN with MSS is not touched."""
    assert clamp_mss(build(SYN, mss(1460), proto=17), 1360) is None


def test_ip_options_move_the_tcp_header() -> None:
    """With IHL > 5 the TCP header starts after the IP options."""
    pkt = build(SYN, mss(1460), ip_options=NOP * 3 + b"\x00" + b"\x00" * 4)
    assert pkt[0] == 0x47
    assert_clamped(pkt, clamp_mss(pkt, 1360), 1360)


def test_fragments_are_left_alone() -> None:
    """A non-first fragment holds no TCP header; a first one with MF set is clamped."""
    assert clamp_mss(build(SYN, mss(1460), frag=185), 1360) is None
    first = build(SYN, mss(1460), frag=0x2000)
    assert_clamped(first, clamp_mss(first, 1360), 1360)


def test_options_after_end_of_list_are_ignored() -> None:
    """Bytes after kind 0 are padding, not options."""
    for options in (b"\x00" + NOP * 3 + mss(1460), b"\x00\x02" + NOP * 2 + mss(1460)):
        assert clamp_mss(build(SYN, options), 1360) is None


def test_every_mss_option_is_clamped() -> None:
    """Two MSS options (odd, but possible): both are lowered."""
    pkt = build(SYN, mss(1460) + mss(9000))
    out = clamp_mss(pkt, 1360)
    assert out is not None and mss_values(out) == [1360, 1360] and checksum_ok(out)


@pytest.mark.parametrize(
    "options",
    [
        b"\x02\x03\x05\xb4",  # MSS with length 3
        b"\x02\x05\x05\xb4\x00\x00\x00\x00",  # MSS with length 5
        mss(1460) + b"\x08\x00" + b"\x00\x00",  # length 0 after the MSS
        mss(1460) + b"\x08\x01" + b"\x00\x00",  # length 1
        mss(1460) + b"\x08\x0a" + b"\x00\x00",  # runs past the header
        mss(1460) + NOP * 3 + b"\x08",  # kind with no room for a length
        NOP * 2 + b"\x02\x04",  # MSS cut off by the end of the header
    ],
)
def test_malformed_options_leave_the_packet_unchanged(options: bytes) -> None:
    """Any option whose length does not add up: the whole packet is left alone."""
    pkt = build(SYN, options)
    assert clamp_mss(pkt, 1000) is None


def test_malformed_headers_leave_the_packet_unchanged() -> None:
    """Bad data offset, truncated segment, or a total length past the buffer."""
    pkt = bytearray(build(SYN, mss(1460)))
    bad_offset = bytearray(pkt)
    bad_offset[32] = 0x40  # data offset 4 words
    assert clamp_mss(bytes(bad_offset), 1000) is None
    too_long = bytearray(pkt)
    too_long[32] = 0xF0  # data offset 60 bytes, past the packet
    assert clamp_mss(bytes(too_long), 1000) is None
    assert clamp_mss(bytes(pkt[:42]), 1000) is None
    assert clamp_mss(bytes(pkt[:39]), 1000) is None
    past = bytearray(pkt)
    past[2:4] = struct.pack("!H", len(pkt) + 4)
    assert clamp_mss(bytes(past), 1000) is None
    v6 = bytearray(pkt)
    v6[0] = 0x65
    assert clamp_mss(bytes(v6), 1000) is None
    assert clamp_mss(b"", 1000) is None


def test_memoryview_and_bytearray_inputs() -> None:
    """The forwarder may hand over views; the result is a new bytes, the input untouched."""
    pkt = build(SYN, mss(1460))
    for buf in (memoryview(pkt), bytearray(pkt), memoryview(bytearray(pkt))[0:]):
        out = clamp_mss(buf, 1360)
        assert_clamped(pkt, out, 1360)
        assert bytes(buf) == pkt


# --- properties -------------------------------------------------------------------------------

option_items = st.one_of(
    st.just(NOP),
    st.builds(mss, st.integers(0, 0xFFFF)),
    st.just(b"\x04\x02"),
    st.builds(lambda b: b"\x03\x03" + bytes([b]), st.integers(0, 14)),
    st.builds(lambda ts: b"\x08\x0a" + ts, st.binary(min_size=8, max_size=8)),
    st.binary(min_size=0, max_size=6),  # anything, possibly malformed
)
option_lists = st.lists(option_items, max_size=8).map(b"".join).filter(lambda o: len(o) <= 40)


@given(st.binary(max_size=120), st.integers(0, 0xFFFF))
def test_clamp_never_raises_and_keeps_the_sum(data: bytes, limit: int) -> None:
    """Arbitrary bytes never raise; a change keeps the segment's ones' complement sum."""
    out = clamp_mss(data, limit)
    if out is None:
        return
    assert len(out) == len(data)
    # The pseudo-header does not change, so a checksum valid before is valid after.
    assert ones_sum(out) == ones_sum(data) or {ones_sum(out), ones_sum(data)} == {0, 0xFFFF}


@given(
    option_lists,
    st.sampled_from([SYN, SYN | ACK, ACK, SYN | FIN]),
    st.binary(max_size=9),
    st.sampled_from([b"", NOP * 4, NOP * 7 + b"\x00"]),
    st.integers(0, 0xFFFF),
)
def test_clamped_segments_always_verify(
    options: bytes, flags: int, payload: bytes, ip_options: bytes, limit: int
) -> None:
    """Whatever the options, a returned packet has a valid checksum and no MSS above the limit."""
    pkt = build(flags, options, payload=payload, ip_options=ip_options)
    out = clamp_mss(pkt, limit)
    if out is None:
        return
    assert flags & SYN
    assert checksum_ok(out)
    assert all(v <= limit for v in mss_values(out))
    assert out[: (pkt[0] & 0x0F) * 4] == pkt[: (pkt[0] & 0x0F) * 4]


@given(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=3), st.integers(0, 0xFFFF))
def test_well_formed_syns_are_clamped_whenever_needed(values: list[int], limit: int) -> None:
    """With well-formed options, clamping happens exactly when some MSS exceeds the limit."""
    options = b"".join(NOP + mss(v) + NOP * 3 for v in values)
    pkt = build(SYN, options)
    out = clamp_mss(pkt, limit)
    if max(values) <= limit:
        assert out is None
    else:
        assert out is not None and checksum_ok(out)
        assert mss_values(out) == [min(v, limit) for v in values]
