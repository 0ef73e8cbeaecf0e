"""Shared fixtures. The reactor is imported inside fixtures only (pytest-twisted installs it)."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import Phase, settings

#: ``--hypothesis-profile=no-shrink``: a failing example is reported as found, not made
#: smaller first (for runs that only ask whether a test fails, such as a mutant of the C core)
settings.register_profile("no-shrink", phases=[Phase.explicit, Phase.reuse, Phase.generate])


def require_command(name: str, package: str) -> str:
    """The path of command ``name``; skip without it, unless CELLVPN_REQUIRE_NETNS=1 (CI, where
    ``make test`` installs the Debian package), where it fails instead."""
    import shutil

    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"needs {name} (Debian package {package}; make test installs it)"
    if os.environ.get("CELLVPN_REQUIRE_NETNS") == "1":
        pytest.fail(reason + " (CELLVPN_REQUIRE_NETNS=1)")
    pytest.skip(reason)


@pytest.fixture
def reactor() -> Any:
    from twisted.internet import reactor as r

    return r


def require_root(what: str = "network namespaces and TUN devices") -> None:
    """Skip when not root, unless CELLVPN_REQUIRE_NETNS=1 (CI), where it fails instead."""
    if os.geteuid() == 0 and os.path.exists("/dev/net/tun"):
        return
    reason = f"needs root and /dev/net/tun for {what}"
    if os.environ.get("CELLVPN_REQUIRE_NETNS") == "1":
        pytest.fail(reason + " (CELLVPN_REQUIRE_NETNS=1)")
    pytest.skip(reason)


def require_native() -> Any:
    """The C fast path module; skip without it (no compiler at install), unless
    CELLVPN_REQUIRE_NETNS=1 (CI, where ``make test`` installs the compiler first), where it
    fails instead."""
    try:
        from cellvpn.native import _fastpath  # type: ignore[attr-defined]
    except ImportError as e:
        reason = f"needs the C fast path module, which was not built ({e})"
        if os.environ.get("CELLVPN_REQUIRE_NETNS") == "1":
            pytest.fail(reason + " (CELLVPN_REQUIRE_NETNS=1)")
        pytest.skip(reason)
    return _fastpath


@pytest.fixture
def netns() -> Any:
    """A factory of network namespaces, all removed (with their processes) after the test."""
    require_root()
    from cellvpn.lab import Namespace

    made: list[Namespace] = []

    def make(tag: str, ipv6: bool = False) -> Namespace:
        ns = Namespace(tag, ipv6=ipv6)
        made.append(ns)
        return ns

    try:
        yield make
    finally:
        for ns in reversed(made):
            ns.close()
