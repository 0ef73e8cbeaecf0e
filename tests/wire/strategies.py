"""Hypothesis strategies for the wire codecs' values, each field within its range."""

from __future__ import annotations

import ipaddress

from hypothesis import strategies as st

from cellvpn.wire.receipt import UINT256_MAX, Receipt, ReceiptInfo, Signature
from cellvpn.wire.service import CheckPacket, Error, NotifyStopped, Request, Success
from cellvpn.wire.setup import Close, Hello, Welcome
from cellvpn.wire.vpn import LAYOUTS, AddrReply, Layout, VpnPacket

u8 = st.integers(0, 2**8 - 1)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
uint256 = st.integers(0, UINT256_MAX)
hash32 = st.binary(min_size=32, max_size=32)
payload = st.binary(max_size=1500)
ipv4 = st.builds(ipaddress.IPv4Address, u32)


def ops(layout: Layout) -> st.SearchStrategy[int]:
    """The op codes whose 8-byte union is read with ``layout``."""
    return st.sampled_from(sorted(op for op, lay in LAYOUTS.items() if lay is layout))


# --- 'S' --------------------------------------------------------------------------------------

vpn_packets = st.one_of(
    st.builds(VpnPacket, op_code=ops(Layout.DATA), data=payload, sock_id=i32, usage_id=u32),
    st.builds(VpnPacket, op_code=ops(Layout.PROBLEM), sock_id=i32, usage_id=u32, code=u32),
    st.builds(
        VpnPacket,
        op_code=ops(Layout.CONNECT),
        data=st.binary(max_size=64),
        sock_id=i32,
        usage_id=u32,
        port=u16,
    ),
    st.builds(VpnPacket, op_code=ops(Layout.EMPTY), sock_id=i32, usage_id=u32),
    st.builds(VpnPacket, op_code=ops(Layout.RAW), data=payload, sock_id=i32, usage_id=u32, raw=u64),
)

routes = st.builds(
    lambda addr, prefix: ipaddress.IPv4Network((addr, prefix), strict=False),
    u32,
    st.integers(0, 32),
)


@st.composite
def addr_replies(draw: st.DrawFn) -> AddrReply:
    """The original's 8-byte form, or netmask and options (unknown options are read-only)."""
    client, gateway = draw(ipv4), draw(ipv4)
    if draw(st.booleans()):
        return AddrReply(client, gateway)
    return AddrReply(
        client,
        gateway,
        netmask=draw(ipv4),
        mtu=draw(st.none() | u16),
        dns=tuple(draw(st.lists(ipv4, max_size=4))),
        routes=tuple(draw(st.lists(routes, max_size=4))),
    )


# --- 'R' --------------------------------------------------------------------------------------

requests = st.builds(
    Request,
    net_id=u64,
    tx_cond=hash32,
    srv_uid=u64,
    # The decoder strips the NUL padding, so a token cannot end with NUL.
    token=st.binary(max_size=10).filter(lambda t: not t.endswith(b"\0")),
    client_pkey_hash=hash32,
    order_hash=hash32,
    extension=st.binary(max_size=200),
)
successes = st.builds(Success, usage_id=u32, net_id=u64, srv_uid=u64)
errors = st.builds(Error, code=u32, usage_id=u32, net_id=u64, srv_uid=u64)
notifies = st.builds(NotifyStopped, st.none() | errors)

# host_send / host_recv are NUL padded on the wire, so they cannot end with NUL.
host = st.binary(max_size=256).filter(lambda h: not h.endswith(b"\0"))
check_packets = st.builds(
    CheckPacket,
    usage_id=u32,
    net_id=u64,
    srv_uid=u64,
    time_connect_ms=i32,
    recv_time1=u64,
    recv_time2=u64,
    send_time1=u64,
    send_time2=u64,
    host_send=host,
    host_recv=host,
    err_code=i32,
    data_size_send=u64,
    data_size_recv=u64,
    data_hash=hash32,
    data=st.binary(max_size=2000),
)

# --- receipt ----------------------------------------------------------------------------------

infos = st.builds(
    ReceiptInfo,
    srv_uid=u64,
    units_type=u32,
    units=u64,
    value=uint256,
    prev_hash=hash32,
    addition=u64,
    version=u8,
)
signatures = st.builds(
    Signature,
    public_key=st.binary(max_size=64),
    signature=st.binary(max_size=128),
    sig_type=u32,
    hash_type=u8,
)
receipts = st.builds(
    Receipt,
    info=infos,
    signatures=st.lists(signatures, max_size=3).map(tuple),
    exts=st.binary(max_size=100),
)

# --- session setup ----------------------------------------------------------------------------

items = st.dictionaries(u8, st.binary(max_size=300), max_size=10)
ascii_text = st.text(alphabet=st.characters(codec="ascii"), max_size=8)
# Capabilities travel comma separated, so one cannot hold a comma or be empty.
cap = st.text(alphabet=st.characters(codec="ascii", exclude_characters=","), min_size=1)
caps = st.frozensets(cap, max_size=5)
hellos = st.builds(
    Hello,
    version=u16,
    channels=ascii_text,
    caps=caps,
    required_caps=caps,
    max_frame=u32,
    resume_token=st.binary(max_size=64),
    node_addr=u64,
)
welcomes = st.builds(
    Welcome,
    session_id=u32,
    version=u16,
    channels=ascii_text,
    caps=caps,
    max_frame=u32,
    resume_token=st.binary(max_size=64),
    node_addr=u64,
    order=st.binary(max_size=300),
)
# CLOSE sends at most 1000 characters of reason.
closes = st.builds(Close, code=u16, reason=st.text(st.characters(codec="utf-8"), max_size=1000))
