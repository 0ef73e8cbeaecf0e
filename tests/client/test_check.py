"""``vpn_client check``'s plan, arithmetic and judgement of answers, without a network."""

from __future__ import annotations

from dataclasses import replace

from cellvpn.client.check import CheckPlan, check_parameters, chunk_for
from cellvpn.server.check import answer_check, check_data_limit
from cellvpn.wire.service import CheckPacket


def test_parameters() -> None:
    assert check_parameters("192.0.2.1", 8089, 262144, 262144, 10.0) is None
    assert check_parameters("", 8089, 0, 0, 1) == (
        "VPN server address not defined, use -addr <server_address>"
    )
    assert check_parameters("h", 0, 0, 0, 1) == "VPN server port must be 1 to 65535, not 0"
    assert check_parameters("h", True, 0, 0, 1) is not None
    assert check_parameters("h", 1, -1, 0, 1) == "--send must be 0 to 1048576 bytes, not -1"
    assert check_parameters("h", 1, 0, 1048577, 1) == (
        "--recv must be 0 to 1048576 bytes, not 1048577"
    )
    assert check_parameters("h", 1, 600000, 600000, 1) == (
        "--send and --recv together must be at most 1048576 bytes (the server's CHECK budget "
        "per session), not 1200000"
    )
    assert check_parameters("h", 1, 0, 0, 0) is not None
    assert check_parameters("h", 1, 0, 0, 1, 0) == "--probes must be 1 to 20, not 0"


def test_data_per_packet_is_what_both_frames_carry() -> None:
    for peer, own, expected in (
        (262144, 262144, 261500),
        (0, 262144, 261500),  # no limit announced: the default frame
        (65536, 262144, 64892),
        (262144, 1048576, 261500),
        (1500, 262144, 10240),  # never below the original's 10240
    ):
        assert check_data_limit(peer, own) == chunk_for(peer, own) == expected


def serve(plan: CheckPlan, now: float, host: str = "192.0.2.2") -> list[CheckPacket]:
    """The server's own answers to what the plan sends now."""
    return [answer_check(r, host, 0, 1 << 20) for r in plan.to_send(now)]


def test_probes_one_by_one_then_upload_then_download_each_all_at_once() -> None:
    plan = CheckPlan(send=250, recv=130, probes=2, chunk=100, now=0.0)
    rows = []
    now = 0.0
    while not plan.done:
        answers = serve(plan, now)
        rows.append([(a.data_size_send, a.data_size_recv) for a in answers])
        for a in answers:
            now += 0.001
            assert plan.answered(CheckPacket.decode(a.encode()), now) is None
    assert rows == [
        [(0, 0)],
        [(0, 0)],
        [(100, 0), (100, 0), (50, 0)],
        [(0, 100), (0, 30)],
    ]
    f = plan.facts()
    assert (f["sent_bytes"], f["received_bytes"], f["requests"], f["probes"]) == (250, 130, 7, 2)
    assert (f["rtt_min_ms"], f["rtt_avg_ms"], f["rtt_max_ms"]) == (1.0, 1.0, 1.0)
    # upload: out at 0.002, the last of three answers in at 0.005; download: 0.005 to 0.007
    assert (f["upload_ms"], f["download_ms"]) == (3.0, 2.0)
    assert (f["upload_bytes_per_second"], f["download_bytes_per_second"]) == (83333.3, 65000.0)
    assert f["seen_as"] == "192.0.2.2" and f["chunk_bytes"] == 100
    assert plan.progress() == {
        "phase": "done",
        "text": "done",
        "done_bytes": 380,
        "total_bytes": 380,
    }


def test_more_requests_than_the_servers_rate_are_paced() -> None:
    plan = CheckPlan(send=30 * 10, recv=0, probes=1, chunk=10, now=0.0)
    for a in serve(plan, 0.0):
        assert plan.answered(a, 0.0) is None
    first = plan.to_send(0.0)
    assert len(first) == 17  # the probe took one of a burst of 18 (a tenth below 20)
    assert plan.to_send(0.0) == [] and plan.wait(0.0) == 1 / 18
    assert len(plan.to_send(1 / 18)) == 1
    assert plan.wait(1.0) == 0.0 and len(plan.to_send(1.0)) == 12


def test_a_wrong_answer_does_not_count() -> None:
    for change, why in (
        ({"err_code": 0x201}, "the server answered with error 0x201"),
        ({"data": b"x" * 16}, "the data of the answer does not match its hash"),
        ({"send_time1": 8}, "the answer is not for this request"),
        ({"data": b"", "data_hash": CheckPacket.hash_of(b"")}, "asked for 16 bytes, got 0"),
    ):
        plan = CheckPlan(send=0, recv=16, probes=1, chunk=100, now=0.0)
        assert plan.answered(serve(plan, 0.0)[0], 0.0) is None
        good = serve(plan, 0.0)[0]
        assert plan.answered(replace(good, **change), 0.0) == why  # type: ignore[arg-type]
    assert CheckPlan(0, 0, 1, 10, 0.0).answered(CheckPacket(), 0.0) == "an answer to no request"
