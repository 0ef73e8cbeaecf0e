"""Twisted server endpoint strings, checked without a reactor.

``serverFromString`` only complains when the service starts listening, and for some mistakes not
even then (an unknown keyword is a TypeError deep in Twisted). Checking the string here turns
each of those into a config error at load. The syntax follows Twisted's strports parser: ``:``
separates arguments, ``name=value`` names one, a backslash escapes the next character.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cellvpn.config.fields import ParseError, Parser

# Each validator returns what is wrong with an argument's value, or None.
_Validator = Callable[[str], str | None]


def tokenize(description: str) -> tuple[list[str], dict[str, str]]:
    """Split an endpoint string into positional and keyword arguments, as Twisted does."""
    args: list[str] = []
    kwargs: dict[str, str] = {}
    pending: list[str] = []
    current = ""
    ops = ":="  # after a '=', the rest of the argument is its value, '=' included

    def flush() -> None:
        if len(pending) == 1:
            args.append(pending[0])
        else:
            name, value = pending
            if name in kwargs:
                raise ParseError(f"argument {name!r} is given twice")
            kwargs[name] = value

    chars = iter(description)
    for ch in chars:
        if ch in ops:
            pending.append(current)
            current = ""
            if ch == ":":
                flush()
                pending = []
                ops = ":="
            else:
                ops = ":"
        elif ch == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise ParseError("it ends in a lone backslash")
            current += escaped
        else:
            current += ch
    pending.append(current)
    flush()
    return args, kwargs


def _port(value: str) -> str | None:
    if re.fullmatch(r"[0-9]{1,5}", value) and int(value) <= 65535:
        return None
    return f"port {value!r} is not a number from 0 to 65535"


def _count(value: str) -> str | None:
    if re.fullmatch(r"[0-9]{1,9}", value) and int(value) > 0:
        return None
    return f"{value!r} is not a positive integer"


def _index(value: str) -> str | None:
    return None if re.fullmatch(r"[0-9]{1,9}", value) else f"{value!r} is not an index"


def _nonempty(value: str) -> str | None:
    return None if value else "an argument is empty"


def _any_ip(value: str) -> str | None:
    if value == "":
        return None
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f"interface {value!r} is not an IP address"
    return None


def _ipv6(value: str) -> str | None:
    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        return f"interface {value!r} is not an IPv6 address (escape its colons as \\:)"
    return None


def _mode(value: str) -> str | None:
    return None if re.fullmatch(r"[0-7]{1,4}", value) else f"mode {value!r} is not octal"


def _flag(value: str) -> str | None:
    return None if value in ("0", "1") else f"lockfile {value!r} is not 0 or 1"


def _domain(value: str) -> str | None:
    if value in ("INET", "INET6", "UNIX"):
        return None
    return f"domain {value!r} is not INET, INET6 or UNIX"


def _sslmethod(value: str) -> str | None:
    if re.fullmatch(r"[A-Za-z0-9_]+_METHOD", value):
        return None
    return f"sslmethod {value!r} is not an OpenSSL method name such as TLS_METHOD"


@dataclass(frozen=True)
class _Type:
    """One endpoint type: its arguments in positional order, the required ones, their checks."""

    params: tuple[str, ...]
    required: tuple[str, ...]
    checks: Mapping[str, _Validator]


_TYPES: Mapping[str, _Type] = {
    "tcp": _Type(
        ("port", "interface", "backlog"),
        ("port",),
        {"port": _port, "interface": _any_ip, "backlog": _count},
    ),
    "tcp6": _Type(
        ("port", "backlog", "interface"),
        ("port",),
        {"port": _port, "interface": _ipv6, "backlog": _count},
    ),
    "unix": _Type(
        ("address", "mode", "backlog", "lockfile"),
        ("address",),
        {"address": _nonempty, "mode": _mode, "backlog": _count, "lockfile": _flag},
    ),
    "systemd": _Type(
        ("domain", "index", "name"),
        ("domain",),
        {"domain": _domain, "index": _index, "name": _nonempty},
    ),
    "ssl": _Type(
        (
            "port",
            "privateKey",
            "certKey",
            "sslmethod",
            "interface",
            "backlog",
            "extraCertChain",
            "dhParameters",
        ),
        ("port",),
        {
            "port": _port,
            "privateKey": _nonempty,
            "certKey": _nonempty,
            "sslmethod": _sslmethod,
            "interface": _any_ip,
            "backlog": _count,
            "extraCertChain": _nonempty,
            "dhParameters": _nonempty,
        },
    ),
}

_WILDCARDS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class ServerEndpoint:
    """A checked endpoint string: its type and its arguments by name."""

    type: str
    params: Mapping[str, str]

    @property
    def address(self) -> str | None:
        """The IP address it listens on when it names one (not a wildcard), else None."""
        interface = self.params.get("interface", "")
        return None if interface in _WILDCARDS else interface


def plugin_endpoint_types() -> frozenset[str]:
    """The prefixes of the server endpoint plugins installed (``twisted.plugins``)."""
    from twisted.internet.interfaces import IStreamServerEndpointStringParser
    from twisted.plugin import getPlugins

    return frozenset(p.prefix for p in getPlugins(IStreamServerEndpointStringParser))


def parse_server_endpoint(description: str, *, tls: bool = True) -> ServerEndpoint:
    """Check an endpoint string like ``serverFromString`` would, without a reactor.

    ``tls=False`` refuses ``ssl:`` where cellvpn adds TLS itself. Raises :class:`ParseError` with
    what is wrong.
    """
    args, kwargs = tokenize(description)
    name = args[0] if args else ""
    if name in ("ssl", "tls") and not tls:
        raise ParseError(f"{name} is not allowed here: cellvpn adds TLS itself")
    if name == "haproxy":
        # the PROXY protocol in front of another endpoint, which is checked as such
        inner = parse_server_endpoint(description.partition(":")[2], tls=tls)
        return ServerEndpoint(name, inner.params)
    kind = _TYPES.get(name)
    if kind is None:
        if name and name in plugin_endpoint_types():
            # an installed endpoint plugin: Twisted checks its arguments when it listens
            return ServerEndpoint(name, {})
        raise ParseError(f"unknown endpoint type {name!r}")
    positional = args[1:]
    if len(positional) > len(kind.params):
        raise ParseError(f"{name} takes at most {len(kind.params)} arguments")
    params = dict(zip(kind.params, positional, strict=False))
    for key, value in kwargs.items():
        if key not in kind.checks:
            raise ParseError(f"{name} has no argument {key!r}")
        if key in params:
            raise ParseError(f"argument {key!r} is given twice")
        params[key] = value
    for key in kind.required:
        if key not in params:
            raise ParseError(f"{name} needs {key}")
    for key, value in params.items():
        problem = kind.checks[key](value)
        if problem:
            raise ParseError(problem)
    if name == "systemd" and ("index" in params) == ("name" in params):
        raise ParseError("systemd needs exactly one of index and name")
    return ServerEndpoint(name, params)


def endpoint(*, tls: bool) -> Parser[str]:
    """A Twisted server endpoint string, kept as text for ``serverFromString``.

    ``tls=True`` also accepts ``ssl:``, for listeners cellvpn does not wrap in TLS itself.
    """

    def parse(text: str, base: Path) -> str:
        parse_server_endpoint(text, tls=tls)
        return text

    if tls:
        types = (
            "tcp:PORT, tcp6:PORT, unix:PATH, systemd:domain=INET:index=N or ssl:PORT:privateKey=KEY"
        )
    else:
        types = "tcp:PORT, tcp6:PORT, unix:PATH or systemd:domain=INET:index=N"
    return Parser(parse, "a Twisted server endpoint string such as " + types)
