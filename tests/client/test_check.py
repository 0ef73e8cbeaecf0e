"""``vpn_client check``'s arithmetic and its judgement of an answer, without a network."""

from __future__ import annotations

from dataclasses import replace

from cellvpn.client.check import check_parameters, check_request, figures
from cellvpn.server.check import answer_check
from cellvpn.wire.service import CheckPacket


def test_parameters() -> None:
    assert check_parameters("192.0.2.1", 8089, 10240, 10.0) is None
    assert check_parameters("", 8089, 0, 1) == (
        "VPN server address not defined, use -addr <server_address>"
    )
    assert check_parameters("h", 0, 0, 1) == "VPN server port must be 1 to 65535, not 0"
    assert check_parameters("h", True, 0, 1) is not None
    assert check_parameters("h", 1, 10241, 1) == "check size must be 0 to 10240 bytes, not 10241"
    assert check_parameters("h", 1, 0, 0) is not None


def test_an_answer_from_the_servers_own_code_is_timed() -> None:
    request = check_request(4096, 12, 1_000)
    assert CheckPacket.decode(request.encode()) == request
    answer = CheckPacket.decode(answer_check(request, "192.0.2.2", 2_000).encode())
    result = figures(request, answer, connect_s=0.012, sent_s=1.0, answered_s=1.002)
    assert result.problem is None and result.seen_as == "192.0.2.2"
    assert (result.sent_bytes, result.received_bytes) == (4096, 4096)
    assert round(result.rtt_ms, 6) == 2.0 and round(result.connect_ms, 6) == 12.0
    assert round(result.bytes_per_second) == 8192 / 0.002
    assert result.facts()["bytes_per_second"] == 4096000.0


def test_a_wrong_answer_does_not_count() -> None:
    request = check_request(16, 0, 7)
    good = answer_check(request, "192.0.2.2", 9)
    for bad, why in (
        (replace(good, err_code=0x201), "the server answered with error 0x201"),
        (replace(good, data=b"x" * 16), "the data of the answer does not match its hash"),
        (replace(good, send_time1=8), "the answer is not for this request"),
    ):
        assert figures(request, bad, 0, 0, 1).problem == why
