"""The stream's tests run twice: with the C loops (the default where they were built) and with
the Python ones (``CELLVPN_FASTPATH=off``), the same assertions for both."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cellvpn import native
from tests.conftest import require_native


@pytest.fixture(autouse=True, params=["c-loops", "python-loops"])
def loops(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "c-loops":
        require_native()
        monkeypatch.delenv(native.ENV, raising=False)
    else:
        monkeypatch.setenv(native.ENV, "off")
    native.load.cache_clear()
    yield request.param
    native.load.cache_clear()
