"""The server's answer to CHECK_REQUEST: the original's reachability and speed probe."""

from __future__ import annotations

import os
from dataclasses import replace

from cellvpn.wire.service import CheckPacket, ErrorCode

#: Largest data a check may send or ask for, as in the original.
MAX_CHECK_DATA = 10240


def answer_check(request: CheckPacket, client_host: str, now_ns: int) -> CheckPacket:
    """Build CHECK_RESPONSE: echo the header, stamp the times, send the data asked for."""
    if request.data_size_recv > MAX_CHECK_DATA or len(request.data) > MAX_CHECK_DATA:
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
