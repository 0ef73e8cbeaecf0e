"""Twisted server endpoint strings checked without a reactor."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.endpoints import _parse

from cellvpn.config.endpoints import endpoint, parse_server_endpoint, tokenize
from cellvpn.config.fields import ParseError

GOOD = [
    "tcp:8089",
    "tcp:0",
    "tcp:port=8089",
    "tcp:8089:interface=192.0.2.1",
    "tcp:8089:interface=\\:\\:1",
    "tcp:8089:interface=192.0.2.1:backlog=100",
    "tcp:8089:192.0.2.1:100",
    "tcp6:8089",
    "tcp6:8089:interface=\\:\\:1",
    "tcp6:port=8089:backlog=5",
    "unix:/run/cellvpn/vpn.sock",
    "unix:address=/run/x.sock:mode=660:lockfile=0",
    "unix:relative.sock",
    "systemd:domain=INET:index=0",
    "systemd:domain=INET6:name=cellvpn",
    "systemd:domain=UNIX:index=3",
    # the PROXY protocol in front of a TCP listener, and another installed endpoint plugin
    "haproxy:tcp:8089:interface=192.0.2.1",
    "stdio:",
]

BAD = [
    ("", "unknown endpoint type ''"),
    ("8089", "unknown endpoint type '8089'"),
    ("TCP:8089", "unknown endpoint type 'TCP'"),
    ("udp:53", "unknown endpoint type 'udp'"),
    ("haproxy:tcp:99999", "port '99999' is not"),
    ("haproxy:udp:53", "unknown endpoint type 'udp'"),
    ("tcp", "tcp needs port"),
    ("tcp:", "port '' is not"),
    ("tcp:99999", "port '99999' is not"),
    ("tcp:http", "port 'http' is not"),
    ("tcp:8089:interface=vpn.example.net", "not an IP address"),
    ("tcp:8089:backlog=0", "not a positive integer"),
    ("tcp:8089:bogus=1", "tcp has no argument 'bogus'"),
    ("tcp:8089:port=8090", "given twice"),
    ("tcp:8089:interface=192.0.2.1:interface=192.0.2.2", "given twice"),
    ("tcp:1:2.2.2.2:3:4", "at most 3 arguments"),
    ("tcp6:8089:interface=192.0.2.1", "not an IPv6 address"),
    ("unix:", "an argument is empty"),
    ("unix:/x.sock:mode=999", "not octal"),
    ("unix:/x.sock:lockfile=yes", "not 0 or 1"),
    ("systemd:domain=INET", "exactly one of index and name"),
    ("systemd:domain=INET:index=0:name=x", "exactly one of index and name"),
    ("systemd:domain=PACKET:index=0", "not INET, INET6 or UNIX"),
    ("systemd:domain=INET:index=-1", "not an index"),
    ("tcp:8089\\", "lone backslash"),
]


@pytest.mark.parametrize("text", GOOD)
def test_good_endpoints(text: str) -> None:
    """Endpoint strings serverFromString accepts pass the check."""
    parse_server_endpoint(text, tls=False)


@pytest.mark.parametrize(("text", "detail"), BAD)
def test_bad_endpoints(text: str, detail: str) -> None:
    """Endpoint strings serverFromString would refuse fail here, saying why."""
    with pytest.raises(ParseError) as info:
        parse_server_endpoint(text, tls=True)
    assert detail in str(info.value)


def test_ssl_only_where_allowed() -> None:
    """ssl: is refused where cellvpn adds TLS itself, and checked where it does not."""
    with pytest.raises(ParseError, match="cellvpn adds TLS itself"):
        parse_server_endpoint("ssl:443:privateKey=key.pem", tls=False)
    found = parse_server_endpoint("ssl:443:privateKey=key.pem:certKey=cert.pem", tls=True)
    assert found.params["certKey"] == "cert.pem"
    with pytest.raises(ParseError, match="sslmethod"):
        parse_server_endpoint("ssl:443:sslmethod=bogus", tls=True)


def test_parser_wraps_check() -> None:
    """The endpoint parser keeps the text as given and names the accepted types."""
    parser = endpoint(tls=False)
    assert parser.parse("tcp:8089", Path("/")) == "tcp:8089"
    assert "tcp:PORT" in parser.expected and "ssl" not in parser.expected
    assert "ssl:PORT" in endpoint(tls=True).expected


def test_address_when_named() -> None:
    """An endpoint's address is its interface unless it is a wildcard or missing."""
    assert parse_server_endpoint("tcp:8089:interface=192.0.2.1").address == "192.0.2.1"
    assert parse_server_endpoint("tcp6:8089:interface=\\:\\:1").address == "::1"
    assert parse_server_endpoint("tcp:8089").address is None
    assert parse_server_endpoint("tcp:8089:interface=0.0.0.0").address is None
    assert parse_server_endpoint("unix:/x.sock").address is None


@pytest.mark.parametrize(
    "text", [*GOOD, "a=b=c:d", "x:y\\:z:k=v\\=w", "ssl:443:privateKey=a\\:b.pem", ":"]
)
def test_tokenizer_agrees_with_twisted(text: str) -> None:
    """The tokenizer splits strings exactly as Twisted's strports parser does."""
    args, kwargs = _parse(text)  # type: ignore[no-untyped-call]
    assert tokenize(text) == (args, kwargs)


def test_haproxy_in_front_names_the_address_of_its_listener() -> None:
    assert parse_server_endpoint("haproxy:tcp:8089:interface=192.0.2.1").address == "192.0.2.1"
    with pytest.raises(ParseError, match="ssl is not allowed here"):
        parse_server_endpoint("haproxy:ssl:8089:privateKey=k.pem", tls=False)
    with pytest.raises(ParseError, match="tls is not allowed here"):
        parse_server_endpoint("tls:8089", tls=False)
