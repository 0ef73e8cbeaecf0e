"""Capabilities negotiated at session setup (HELLO offers, WELCOME agrees).

A capability changes what may be sent on the stream, so a side uses one only once both agreed.
"""

#: ADDR_REPLY carries the netmask and the option TLVs after the original's 8 bytes.
ADDR_OPTIONS = "addr-options"

#: VPN_SEND_GSO / VPN_RECV_GSO carry a virtio_net_hdr and a TCP super-packet of up to 64 KiB.
OFFLOAD = "offload"

#: The capabilities this version of cellvpn knows.
KNOWN = frozenset({ADDR_OPTIONS, OFFLOAD})
