"""The client's life table, the usage table and the reconnect back-off."""

from __future__ import annotations

import pytest

from cellvpn.client.backoff import Backoff
from cellvpn.client.machine import STATUS_TEXT, TRANSITIONS, ClientInput, ClientState, new_machine
from cellvpn.fsm import InvalidTransitionError
from cellvpn.server.usage import ACTIVE, UsageInput, UsageState
from cellvpn.server.usage import TRANSITIONS as USAGE


@pytest.mark.parametrize("row", sorted(TRANSITIONS.items(), key=str), ids=str)
def test_every_client_transition(row: tuple[tuple[ClientState, ClientInput], ClientState]) -> None:
    """Each row moves the client from its state to its target."""
    (state, event), target = row
    machine = new_machine()
    machine._state = state
    assert machine.fire(event) is target


def test_client_inputs_without_a_row_raise() -> None:
    """UP before START, or LINK_LOST while not started, is a bug that raises."""
    machine = new_machine()
    for event in (ClientInput.UP, ClientInput.LINK_LOST, ClientInput.STOP):
        with pytest.raises(InvalidTransitionError):
            machine.fire(event)


def test_original_state_numbers_and_texts() -> None:
    """The original's numbers and status lines."""
    assert [int(s) for s in ClientState][:4] == [0, 1, 2, 3]
    assert STATUS_TEXT[ClientState.CONN_LOST] == "VPN client lost connection"
    assert STATUS_TEXT[ClientState.STARTED] == "VPN client started"


@pytest.mark.parametrize("row", sorted(USAGE.items(), key=str), ids=str)
def test_every_usage_transition(row: tuple[tuple[UsageState, UsageInput], UsageState]) -> None:
    """Each usage row moves the usage from its state to its target."""
    from cellvpn.server.usage import new_usage

    (state, event), target = row
    usage = new_usage()
    usage._state = state
    assert usage.fire(event) is target


def test_usage_numbers_and_active_states() -> None:
    """IDLE 0, GRACE 1, NORMAL 2, ERROR 3, FREE 4; traffic flows in GRACE, NORMAL, FREE."""
    assert [int(s) for s in UsageState] == [0, 1, 2, 3, 4]
    assert {UsageState.GRACE, UsageState.NORMAL, UsageState.FREE} == ACTIVE


def test_backoff_grows_caps_and_resets() -> None:
    """Delays lie between half and all of a doubling ceiling, capped, and reset."""
    low = Backoff(initial=1, maximum=8, rand=lambda: 0.0)
    high = Backoff(initial=1, maximum=8, rand=lambda: 1.0)
    assert [low.next() for _ in range(6)] == [0.5, 1, 2, 4, 4, 4]
    assert [high.next() for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    high.reset()
    assert high.next() == 1
