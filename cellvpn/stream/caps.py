"""Capabilities negotiated at session setup (HELLO offers, WELCOME agrees).

A capability changes what may be sent on the stream, so a side uses one only once both agreed.
"""

#: ADDR_REPLY carries the netmask and the option TLVs after the original's 8 bytes.
ADDR_OPTIONS = "addr-options"

#: VPN_SEND_GSO / VPN_RECV_GSO carry a virtio_net_hdr and a TCP super-packet of up to 64 KiB.
OFFLOAD = "offload"

#: ADDR_REPLY may carry an IPv6 address, gateway, DNS servers and routes (tags 4-7), and 'S'
#: carries IPv6 packets both ways. Offered by a server only when it has an IPv6 prefix.
IPV6 = "ipv6"

#: The capabilities this version of cellvpn knows.
KNOWN = frozenset({ADDR_OPTIONS, OFFLOAD, IPV6})
