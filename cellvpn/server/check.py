"""The server's answer to CHECK_REQUEST: the original's reachability and speed probe."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from cellvpn.wire.channel import HEADER_SIZE
from cellvpn.wire.frame import DEFAULT_MAX_PAYLOAD
from cellvpn.wire.service import TEST_HEADER_SIZE, CheckPacket, ErrorCode

#: Data a check may always send or ask for, as in the original (its clients send no more).
MAX_CHECK_DATA = 10240


def check_data_limit(peer_max_frame: int, own_max_frame: int) -> int:
    """The most data one CHECK packet may carry: what fits in a frame both ends accept (the
    channel header and the 628-byte test header taken off), never below the original's
    10240. A peer that announced no limit is taken at the protocol's default frame."""
    frame = min(peer_max_frame or DEFAULT_MAX_PAYLOAD, own_max_frame or DEFAULT_MAX_PAYLOAD)
    return max(MAX_CHECK_DATA, frame - HEADER_SIZE - TEST_HEADER_SIZE)


def answer_check(
    request: CheckPacket, client_host: str, now_ns: int, max_data: int = MAX_CHECK_DATA
) -> CheckPacket:
    """Build CHECK_RESPONSE: echo the header, stamp the times, send the data asked for."""
    if request.data_size_recv > max_data or len(request.data) > max_data:
        return replace(request, data=b"", err_code=ErrorCode.TX_COND_WRONG_SIZE, recv_time2=now_ns)
    if not request.hash_ok:
        return replace(request, data=b"", err_code=ErrorCode.WRONG_HASH, recv_time2=now_ns)
    data = os.urandom(request.data_size_recv) if request.data_size_recv else b""
    return replace(
        request,
        data=data,
        data_hash=CheckPacket.hash_of(data),
        host_send=client_host.encode("ascii", "replace")[:256],
        recv_time2=now_ns,
        err_code=0,
    )


@dataclass
class CheckCounters:
    """What the server answered to CHECKs since it started: the figures a client's check
    reports can be held against these."""

    requests: int = 0
    #: data bytes the clients sent in CHECK_REQUESTs (uploads)
    from_client_bytes: int = 0
    #: data bytes sent back in CHECK_RESPONSEs (downloads)
    to_client_bytes: int = 0

    def answered(self, request: CheckPacket, answer: CheckPacket) -> None:
        self.requests += 1
        self.from_client_bytes += len(request.data)
        self.to_client_bytes += len(answer.data)

    def describe(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "from_client_bytes": self.from_client_bytes,
            "to_client_bytes": self.to_client_bytes,
        }
