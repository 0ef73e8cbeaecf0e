"""Which loops a stream runs: ``fastpath`` and ``CELLVPN_FASTPATH``, and what each says."""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from typing import Any

import pytest

from cellvpn import native
from cellvpn.errors import StartupError
from cellvpn.native import FastPathMode
from cellvpn.stream.connection import Role, StreamConnection, StreamSettings
from tests.conftest import require_native


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(native.ENV, raising=False)
    native.load.cache_clear()
    yield
    native.load.cache_clear()


@pytest.fixture
def unbuilt(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine where pip could not compile the module."""
    real = builtins.__import__

    def imports(
        name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0
    ) -> Any:
        if fromlist and "_fastpath" in fromlist:
            raise ImportError("cannot import name '_fastpath' (not built here)")
        return real(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", imports)


def test_auto_and_on_run_the_c_loops_where_they_were_built() -> None:
    c = require_native()
    for mode in ("auto", "on"):
        fast = native.load(mode)
        assert fast.native and fast.scan is c.scan_frames and fast.pack is c.pack_data
        assert fast.why == "C (cellvpn.native._fastpath)"
    assert StreamConnection(Role.CLIENT).fastpath.native  # the default is auto


def test_off_runs_the_python_loops() -> None:
    fast = native.load("off")
    assert (fast.scan, fast.pack, fast.why) == (None, None, "Python (fastpath = off)")
    conn = StreamConnection(Role.SERVER, StreamSettings(fastpath="off"))
    assert not conn.fastpath.native and conn._pack is None


def test_the_environment_overrides_auto_only(monkeypatch: pytest.MonkeyPatch) -> None:
    require_native()
    monkeypatch.setenv(native.ENV, " OFF ")
    assert native.load("auto").why == "Python (fastpath = off)"
    assert native.load("on").native  # a configured choice is not overridden
    native.load.cache_clear()
    monkeypatch.setenv(native.ENV, "fast")
    with pytest.raises(ValueError, match=r"CELLVPN_FASTPATH='fast': expected one of auto, on, off"):
        native.load("auto")


def test_without_the_module_auto_says_why_and_on_refuses(unbuilt: None) -> None:
    fast = native.load("auto")
    assert not fast.native
    assert (
        fast.why
        == "Python (the C module is not built: cannot import name '_fastpath' (not built here))"
    )
    with pytest.raises(native.FastPathUnavailableError) as e:
        native.load("on")
    assert str(e.value).startswith("fastpath = on, but the C module cannot be loaded: ")
    assert "C compiler and the Python headers" in str(e.value)
    # at a service's start that is one line and exit status 1
    with pytest.raises(StartupError, match=r"^fastpath = on, but the C module cannot be loaded"):
        native.chosen(FastPathMode.ON)
    assert not native.chosen(FastPathMode.AUTO).native


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match=r"fastpath = 'fast': expected one of auto, on, off"):
        native.load("fast")
