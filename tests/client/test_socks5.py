"""The SOCKS5 handshake parser: methods, CONNECT by each address type, refusals, fuzz."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellvpn.client.socks5 import ConnectRequest, Reply, Socks5Error, Socks5Handshake, reply

GREETING = b"\x05\x01\x00"


def connect(atyp: int, address: bytes, port: int = 80, cmd: int = 1) -> bytes:
    return bytes((5, cmd, 0, atyp)) + address + struct.pack("!H", port)


def run(data: bytes, step: int = 0) -> tuple[ConnectRequest | None, bytes, bool, bytes]:
    """Feed ``data`` (in ``step``-byte pieces when step > 0); everything the parser said."""
    hs = Socks5Handshake()
    pieces = [data] if step <= 0 else [data[i : i + step] for i in range(0, len(data), step)]
    found = None
    out = b""
    for piece in pieces or [b""]:
        got = hs.feed(piece)
        found = found or got
        out += hs.data_to_send()
    return found, out, hs.refused, hs.rest


@pytest.mark.parametrize(
    ("request_bytes", "host"),
    [
        (connect(1, bytes((198, 19, 0, 10))), "198.19.0.10"),
        (connect(3, b"\x0bexample.org"), "example.org"),
        (connect(4, bytes.fromhex("20010db8000000000000000000000001")), "2001:db8::1"),
    ],
)
def test_connect_by_each_address_type(request_bytes: bytes, host: str) -> None:
    for step in (0, 1, 3):
        found, out, refused, rest = run(GREETING + request_bytes + b"early", step)
        assert found == ConnectRequest(host, 80)
        assert out == b"\x05\x00" and not refused and rest == b"early"


def test_no_acceptable_method_gets_ff_and_closes() -> None:
    found, out, refused, _ = run(b"\x05\x02\x01\x02" + connect(1, b"\x01\x02\x03\x04"))
    assert found is None and out == b"\x05\xff" and refused


def test_no_auth_among_others_is_chosen() -> None:
    found, out, _, _ = run(b"\x05\x03\x02\x01\x00" + connect(1, b"\xc6\x13\x00\x0a", 8080))
    assert out == b"\x05\x00" and found == ConnectRequest("198.19.0.10", 8080)


@pytest.mark.parametrize("cmd", [2, 3, 9])
def test_bind_and_udp_associate_are_not_supported(cmd: int) -> None:
    found, out, refused, _ = run(GREETING + connect(1, b"\xc6\x13\x00\x0a", cmd=cmd))
    assert found is None and refused
    assert out == b"\x05\x00" + b"\x05\x07\x00\x01" + bytes(6)


def test_unknown_address_type_gets_08() -> None:
    found, out, refused, _ = run(GREETING + b"\x05\x01\x00\x07")
    assert found is None and refused and out[2:4] == b"\x05\x08"


@pytest.mark.parametrize(
    "data",
    [
        b"\x04\x01\x00\x50",  # SOCKS4
        b"GET / HTTP/1.1\r\n",
        b"\x05\x00",  # no methods
        GREETING + b"\x04\x01\x00\x01",  # request with the wrong version
        GREETING + connect(3, b"\x00"),  # empty domain
        GREETING + connect(3, b"\x02\xc3\xa9"),  # not ASCII
    ],
)
def test_malformed_input_raises(data: bytes) -> None:
    with pytest.raises(Socks5Error):
        run(data)


def test_incomplete_input_waits() -> None:
    found, out, refused, _ = run(GREETING + connect(3, b"\x0bexample.org")[:-1])
    assert found is None and out == b"\x05\x00" and not refused


def test_reply_builders() -> None:
    assert reply(Reply.SUCCEEDED) == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    assert reply(Reply.NOT_ALLOWED)[1] == 0x02
    assert reply(Reply.NETWORK_UNREACHABLE)[1] == 0x03
    assert reply(Reply.CONNECTION_REFUSED)[1] == 0x05
    assert reply(Reply.GENERAL_FAILURE)[1] == 0x01
    assert reply(0, "2001:db8::1", 443) == (
        b"\x05\x00\x00\x04" + bytes.fromhex("20010db8000000000000000000000001") + b"\x01\xbb"
    )


def test_bytes_after_the_request_are_kept_not_parsed() -> None:
    hs = Socks5Handshake()
    assert hs.feed(GREETING + connect(1, b"\xc6\x13\x00\x0a")) is not None
    assert hs.feed(b"\x05\x01\x00more") is None
    assert hs.rest == b"\x05\x01\x00more"


@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=300).map(lambda b: GREETING + b),
        st.binary(max_size=300).map(lambda b: GREETING + b"\x05" + b),
    ),
    step=st.integers(0, 7),
)
def test_fuzz_only_socks5_error_and_splitting_changes_nothing(data: bytes, step: int) -> None:
    """Any bytes in any pieces: Socks5Error or an answer, and the same answer however split."""
    try:
        whole = run(data)
    except Socks5Error:
        whole = None
    try:
        split = run(data, step)
    except Socks5Error:
        split = None
    assert whole == split
