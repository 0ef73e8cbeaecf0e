"""The client's servers: configured and learned from the provider's offers, and the choice by
round-trip time and price; the fail-over row of the client's table."""

from __future__ import annotations

import stat
from pathlib import Path

from cellvpn.billing.keys import KeyPair
from cellvpn.billing.offers import make_offer
from cellvpn.billing.records import Order
from cellvpn.client.machine import TRANSITIONS, ClientInput, ClientState
from cellvpn.client.servers import Candidate, ServerList
from cellvpn.config.parsers import HostPort
from cellvpn.wire.receipt import Unit

PROVIDER = KeyPair.from_seed(b"p" * 32)
STRANGER = KeyPair.from_seed(b"s" * 32)
NOW = 1_000_000.0


def offer(endpoint: str, price: int, expires: float = NOW + 90, key: KeyPair = PROVIDER) -> bytes:
    base = Order(Unit.SEC, 10, price, "CELL", key.public, 0)
    return make_offer(
        key, base, endpoint=endpoint, spki="ab" * 32, region="eu", capacity=10, sessions=0,
        instance="i", expires=int(expires),
    ).encode()  # fmt: skip


def test_the_fail_over_row() -> None:
    assert TRANSITIONS[(ClientState.CONN_LOST, ClientInput.FAIL_OVER)] is ClientState.CONN_LOST
    assert [k for k in TRANSITIONS if k[1] is ClientInput.FAIL_OVER] == [
        (ClientState.CONN_LOST, ClientInput.FAIL_OVER)
    ]


def test_offers_are_taken_only_from_the_provider(tmp_path: Path) -> None:
    servers = ServerList([HostPort("192.0.2.1", 8089)], tmp_path)
    dropped = servers.learn(
        PROVIDER.public,
        [offer("192.0.2.2:8089", 20), offer("192.0.2.3:8089", 20, key=STRANGER), b"junk"],
    )
    assert len(dropped) == 2 and "another provider's" in dropped[0]
    assert [c.endpoint for c in servers.learned] == ["192.0.2.2:8089"]
    assert servers.learned[0] == Candidate("192.0.2.2", 8089, 2.0, "eu", NOW + 90, "ab" * 32)
    servers.save()
    assert stat.S_IMODE((tmp_path / "orders.json").stat().st_mode) == 0o600
    again = ServerList([], tmp_path)
    assert again.load() is None and again.learned == servers.learned
    (tmp_path / "orders.json").write_text("{")
    assert "orders.json" in str(ServerList([], tmp_path).load())


def test_the_choice_is_by_rtt_then_price_within_the_maximum() -> None:
    servers = ServerList([HostPort("192.0.2.1", 8089), HostPort("192.0.2.1", 8089)])
    servers.learn(
        PROVIDER.public,
        [
            offer("192.0.2.2:8089", 20),  # 2 per unit
            offer("192.0.2.3:8089", 10),  # 1 per unit
            offer("192.0.2.4:8089", 50),  # 5 per unit: above the maximum
            offer("192.0.2.5:8089", 10, expires=NOW),  # stale: Not available
        ],
    )
    pool = servers.candidates(NOW, max_unit_price=3)
    assert [c.endpoint for c in pool] == ["192.0.2.1:8089", "192.0.2.2:8089", "192.0.2.3:8089"]
    assert [c.endpoint for c in servers.candidates(NOW, None)][-1] == "192.0.2.4:8089"
    rtts = {"192.0.2.2:8089": 0.004, "192.0.2.3:8089": 0.004, "192.0.2.1:8089": 0.009}
    assert [c.endpoint for c in servers.choose(NOW, 3, rtts)] == [
        "192.0.2.3:8089",  # as fast as .2, cheaper
        "192.0.2.2:8089",
        "192.0.2.1:8089",
    ]
    # nothing measured: by price, an unknown price last; the lost one goes last of all
    assert [c.endpoint for c in servers.choose(NOW, 3, {})] == [
        "192.0.2.3:8089",
        "192.0.2.2:8089",
        "192.0.2.1:8089",
    ]
    assert [c.endpoint for c in servers.choose(NOW, 3, {}, lost="192.0.2.3:8089")] == [
        "192.0.2.2:8089",
        "192.0.2.1:8089",
        "192.0.2.3:8089",
    ]
    # unmeasured after measured
    first = servers.choose(NOW, 3, {"192.0.2.1:8089": 0.5})[0]
    assert first.endpoint == "192.0.2.1:8089"


def test_an_ipv6_endpoint_is_written_in_brackets() -> None:
    assert Candidate("2001:db8::1", 8089).endpoint == "[2001:db8::1]:8089"
