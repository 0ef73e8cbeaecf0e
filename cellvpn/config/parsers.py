"""Parsers for the value types of config keys: text in, typed value out, or :class:`ParseError`.

They are strict on purpose: a value that is not clearly right is rejected at load, with what was
expected, rather than misread later by the running service.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from pathlib import Path
from typing import NamedTuple, TypeVar

from cellvpn.config.fields import ParseError, Parser

T = TypeVar("T")
E = TypeVar("E", bound=StrEnum)

IPNetwork = IPv4Network | IPv6Network


def _bool(text: str, base: Path) -> bool:
    word = text.lower()
    if word in ("true", "yes", "on", "1"):
        return True
    if word in ("false", "no", "off", "0"):
        return False
    raise ParseError


BOOL: Parser[bool] = Parser(
    _bool, "a boolean: true/false, yes/no, on/off or 1/0", lambda v: "true" if v else "false"
)

_INT = re.compile(r"[+-]?[0-9]+")


def integer(lo: int, hi: int | None = None, *, expected: str | None = None) -> Parser[int]:
    """An integer from ``lo`` to ``hi`` (inclusive; no upper bound when ``hi`` is None)."""
    if expected is None:
        if hi is not None:
            expected = f"an integer from {lo} to {hi}"
        elif lo == 0:
            expected = "a non-negative integer"
        else:
            expected = f"an integer of at least {lo}"

    def parse(text: str, base: Path) -> int:
        if not _INT.fullmatch(text):
            raise ParseError
        try:
            value = int(text)
        except ValueError:  # more digits than Python converts
            raise ParseError from None
        if value < lo or (hi is not None and value > hi):
            raise ParseError
        return value

    return Parser(parse, expected)


_NUMBER = re.compile(r"\+?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def format_number(value: float) -> str:
    """Write a number of seconds the way a person would: 3, not 3.0."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def seconds(lo: float, hi: float) -> Parser[float]:
    """A duration in seconds from ``lo`` to ``hi``; fractions allowed, no exponents."""

    def parse(text: str, base: Path) -> float:
        if not _NUMBER.fullmatch(text):
            raise ParseError
        value = float(text)
        if not (math.isfinite(value) and lo <= value <= hi):
            raise ParseError
        return value

    expected = f"a number of seconds from {format_number(lo)} to {format_number(hi)}"
    return Parser(parse, expected, format_number)


def number(lo: float, hi: float) -> Parser[float]:
    """A plain number (a rate) from ``lo`` to ``hi``; fractions allowed, no exponents."""
    as_seconds = seconds(lo, hi)
    expected = f"a number from {format_number(lo)} to {format_number(hi)}"
    return Parser(as_seconds.parse, expected, format_number)


def optional(parser: Parser[T]) -> Parser[T | None]:
    """The same parser, with empty text meaning "not set" (None)."""

    def parse(text: str, base: Path) -> T | None:
        return None if text == "" else parser.parse(text, base)

    def render(value: T | None) -> str:
        return "" if value is None else parser.render(value)

    return Parser(parse, parser.expected, render)


def _path(text: str, base: Path) -> Path:
    if text == "" or "\0" in text:
        raise ParseError
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path


#: A path; a relative one is taken from the config file's folder, ``~`` is the user's home.
PATH: Parser[Path] = Parser(_path, "a path (relative paths start at the config file's folder)")


def _executable(text: str, base: Path) -> Path:
    path = _path(text, base)
    if not path.exists():
        raise ParseError(f"{path} does not exist")
    if not path.is_file():
        raise ParseError(f"{path} is not a file")
    if not os.access(path, os.X_OK):
        raise ParseError(f"{path} is not executable")
    return path


#: An executable file (a hook): checked when the config is read, so a typo stops the start.
EXECUTABLE: Parser[Path] = Parser(
    _executable, "the path of an executable file (relative paths start at the config file's folder)"
)


@dataclass(frozen=True)
class InlinePem:
    """PEM text written in the config file itself (continuation lines under the key)."""

    text: str

    @property
    def data(self) -> bytes:
        return self.text.encode("ascii") + b"\n"

    def __str__(self) -> str:
        return "(PEM text in the config file)"


#: A PEM file, or the PEM text itself, as a key of a self-contained client file holds it.
PemSource = Path | InlinePem

_PEM_BLOCK = re.compile(
    r"(?:-----BEGIN [A-Z0-9 ]+-----\n[A-Za-z0-9+/=\n]+?-----END [A-Z0-9 ]+-----\s*)+"
)


def _pem_source(text: str, base: Path) -> PemSource:
    if text.lstrip().startswith("-----BEGIN"):
        lines = "\n".join(line.strip() for line in text.strip().splitlines())
        if not text.isascii() or not _PEM_BLOCK.fullmatch(lines + "\n"):
            raise ParseError("PEM text must be whole BEGIN ... END blocks")
        return InlinePem(lines)
    return _path(text, base)


PEM_SOURCE: Parser[PemSource] = Parser(
    _pem_source,
    "a path (relative paths start at the config file's folder), or PEM text on the lines"
    " below the key, each indented",
    lambda v: v.text if isinstance(v, InlinePem) else str(v),
)


def _ipv4(text: str, base: Path) -> IPv4Address:
    try:
        return IPv4Address(text)
    except ValueError:
        raise ParseError from None


IPV4: Parser[IPv4Address] = Parser(_ipv4, "a dotted IPv4 address such as 10.11.12.0")


def prefix_of_netmask(mask: IPv4Address) -> int | None:
    """The prefix length of a contiguous netmask, or None for a mask with holes."""
    hostbits = ~int(mask) & 0xFFFFFFFF
    if hostbits & (hostbits + 1):
        return None
    return 32 - hostbits.bit_length()


def netmask(shortest: int, longest: int) -> Parser[IPv4Address]:
    """A dotted, contiguous IPv4 netmask with a prefix length from ``shortest`` to ``longest``."""

    def parse(text: str, base: Path) -> IPv4Address:
        mask = _ipv4(text, base)
        prefix = prefix_of_netmask(mask)
        if prefix is None:
            raise ParseError("its one bits are not contiguous")
        if not shortest <= prefix <= longest:
            raise ParseError(f"/{prefix} is out of range")
        return mask

    def dotted(prefix: int) -> str:
        return str(IPv4Network(f"0.0.0.0/{prefix}").netmask)

    expected = (
        f"a contiguous dotted IPv4 netmask from {dotted(shortest)} (/{shortest})"
        f" to {dotted(longest)} (/{longest})"
    )
    return Parser(parse, expected)


_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def is_dns_name(text: str) -> bool:
    """A syntactically valid host name; an all-digit last label is a mistyped IPv4 address."""
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    return all(_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _name(text: str, base: Path) -> str:
    if not (is_dns_name(text) or _is_ip(text)):
        raise ParseError
    return text


#: A DNS name or an IPv4 or IPv6 address, as certificates name hosts.
NAME: Parser[str] = Parser(_name, "a DNS name or an IP address")


def _network(text: str, base: Path) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        raise ParseError from None


NETWORK: Parser[IPNetwork] = Parser(
    _network, "an IPv4 or IPv6 network without host bits, such as 198.18.0.0/15 or 2001:db8::/32"
)


def list_of(item: Parser[T], plural: str) -> Parser[tuple[T, ...]]:
    """Comma-separated items, optionally in brackets as ``[a,b]``; empty text is the empty list."""

    def parse(text: str, base: Path) -> tuple[T, ...]:
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1].strip()
        if text == "":
            return ()
        out = []
        for part in text.split(","):
            part = part.strip()
            if part == "":
                raise ParseError("an item is empty")
            try:
                out.append(item.parse(part, base))
            except ParseError:
                raise ParseError(f"{part!r} is not one") from None
        return tuple(out)

    def render(values: tuple[T, ...]) -> str:
        return ", ".join(item.render(v) for v in values)

    return Parser(parse, f"a comma-separated list of {plural}", render)


_CONGESTION = re.compile(r"[a-z0-9_]{1,15}")


def _congestion(text: str, base: Path) -> str | None:
    if text == "system":
        return None
    if not _CONGESTION.fullmatch(text):
        raise ParseError
    return text


#: A Linux TCP congestion control module name (``cubic``, ``bbr``, ``reno`` ...), ``auto`` (chosen
#: per connection, see cellvpn.conn.congestion), or ``system`` (None) for the kernel's default.
CONGESTION: Parser[str | None] = Parser(
    _congestion,
    "auto, a TCP congestion control name such as cubic, bbr or reno, or system for the kernel's"
    " default",
    lambda v: "system" if v is None else v,
)


_IFNAME_BAD = re.compile(r"[/:\s\x00-\x1f\x7f]")


def _ifname(text: str, base: Path) -> str:
    if len(text) > 15 or text in (".", "..") or _IFNAME_BAD.search(text):
        raise ParseError
    return text


#: A Linux network interface name (at most IFNAMSIZ - 1 bytes, none of '/', ':', blanks).
IFNAME: Parser[str] = Parser(
    _ifname, "a network interface name: 1 to 15 characters, without '/', ':' or spaces"
)


class HostPort(NamedTuple):
    """A server's address as the client dials it: a DNS name or IP literal, and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


_BRACKETED = re.compile(r"\[([^\]]*)\]:([0-9]{1,5})")
_PLAIN = re.compile(r"([^:\[\]]+):([0-9]{1,5})")


def _host_port(text: str, base: Path) -> HostPort:
    if m := _BRACKETED.fullmatch(text):
        host, port = m.group(1), int(m.group(2))
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ParseError(f"{host!r} is not an IPv6 address") from None
    elif m := _PLAIN.fullmatch(text):
        host, port = m.group(1), int(m.group(2))
        if not (is_dns_name(host) or _is_ip(host)):
            raise ParseError(f"{host!r} is not a DNS name or an IPv4 address")
    else:
        raise ParseError
    if not 1 <= port <= 65535:
        raise ParseError(f"port {port} is out of range")
    return HostPort(host, port)


HOST_PORT: Parser[HostPort] = Parser(
    _host_port,
    "host:port, the host a DNS name, an IPv4 address or an [IPv6] address, the port 1 to 65535",
)

_FINGERPRINT = re.compile(r"(?:[0-9a-f]{2}:){31}[0-9a-f]{2}|[0-9a-f]{64}", re.IGNORECASE)


def _fingerprint(text: str, base: Path) -> str:
    if not _FINGERPRINT.fullmatch(text):
        raise ParseError
    return text.replace(":", "").lower()


#: A certificate's SHA-256 fingerprint as tools print it; kept as 64 lowercase hex digits.
FINGERPRINT: Parser[str] = Parser(
    _fingerprint, "a SHA-256 fingerprint: 64 hex digits, optionally in colon-separated pairs"
)

_HEX64 = re.compile(r"[0-9a-f]{64}", re.IGNORECASE)


def _hex64(text: str, base: Path) -> str:
    if not _HEX64.fullmatch(text):
        raise ParseError
    return text.lower()


#: A 32-byte id (a hash) in hex; kept in lowercase.
HEX64: Parser[str] = Parser(_hex64, "64 hex digits")


def choice(kind: type[E]) -> Parser[E]:
    """One of the values of a string enum, case ignored."""
    members = {member.value.lower(): member for member in kind}

    def parse(text: str, base: Path) -> E:
        try:
            return members[text.lower()]
        except KeyError:
            raise ParseError from None

    def render(value: E) -> str:
        return value.value

    return Parser(parse, "one of " + ", ".join(m.value for m in kind), render)


_BITRATE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(bit|kbit|mbit|gbit)?", re.IGNORECASE)
_BIT_UNITS = {"bit": 1, "kbit": 1_000, "mbit": 1_000_000, "gbit": 1_000_000_000}


def _bitrate(text: str, base: Path) -> int:
    match = _BITRATE.fullmatch(text)
    if match is None:
        raise ParseError
    value = float(match.group(1)) * _BIT_UNITS[(match.group(2) or "bit").lower()]
    if not math.isfinite(value) or value > 1_000_000_000_000:
        raise ParseError
    return int(value)


def _render_bitrate(bits: int) -> str:
    for unit in ("gbit", "mbit", "kbit"):
        size = _BIT_UNITS[unit]
        if bits and bits % size == 0:
            return f"{bits // size}{unit}"
    return str(bits)


#: A rate in bits per second, as tc writes it: 0 (no limit), 800kbit, 20mbit, 1gbit.
BITRATE: Parser[int] = Parser(
    _bitrate, "bits per second, like 0 (no limit), 800kbit, 20mbit or 1gbit", _render_bitrate
)
