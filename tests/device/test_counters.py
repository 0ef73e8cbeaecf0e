"""Session counters as the status, the metrics and a session's end read them."""

from __future__ import annotations

from cellvpn.device.counters import SessionCounters


def test_counters_as_a_dict_name_every_counter_with_its_value() -> None:
    c = SessionCounters(from_client_bytes=5, dropped_rate_down=2, proxy_to_client_bytes=9)
    d = c.as_dict()
    assert len(d) == 21
    assert list(d)[:4] == [
        "from_client_packets", "from_client_bytes", "to_client_packets", "to_client_bytes",
    ]  # fmt: skip
    assert d["from_client_bytes"] == 5 and d["dropped_rate_down"] == 2
    assert d["proxy_to_client_bytes"] == 9 and sum(d.values()) == 16
