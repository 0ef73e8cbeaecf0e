"""The client's life as a table: what ``status`` reports and which moves are allowed.

The first four states and their numbers are the original's (``vpn_client status``); STARTING
is cellvpn's, for the time between ``start`` and the first established session.
"""

from __future__ import annotations

from enum import Enum, IntEnum

from cellvpn.fsm import Machine


class ClientState(IntEnum):
    NOT_STARTED = 0
    STARTED = 1
    STOPPED = 2
    CONN_LOST = 3
    STARTING = 4


class ClientInput(Enum):
    START = "start"  # the user asked to connect
    UP = "up"  # session established (and, with a TUN, the address is set up)
    START_FAILED = "start-failed"  # the first connection could not be made
    LINK_LOST = "link-lost"  # the stream ended or stopped answering
    FAIL_OVER = "fail-over"  # reconnects to the lost server ran out: the next server is tried
    STOP = "stop"  # the user asked to disconnect


_S, _I = ClientState, ClientInput
TRANSITIONS: dict[tuple[ClientState, ClientInput], ClientState] = {
    (_S.NOT_STARTED, _I.START): _S.STARTING,
    (_S.STOPPED, _I.START): _S.STARTING,
    (_S.STARTING, _I.UP): _S.STARTED,
    (_S.STARTING, _I.START_FAILED): _S.STOPPED,
    (_S.STARTING, _I.STOP): _S.STOPPED,
    (_S.STARTED, _I.LINK_LOST): _S.CONN_LOST,
    (_S.STARTED, _I.STOP): _S.STOPPED,
    (_S.CONN_LOST, _I.UP): _S.STARTED,
    # still without a connection, now to another server of the provider
    (_S.CONN_LOST, _I.FAIL_OVER): _S.CONN_LOST,
    (_S.CONN_LOST, _I.STOP): _S.STOPPED,
}
del _S, _I

#: ``vpn_client status`` text of the original, per state.
STATUS_TEXT = {
    ClientState.NOT_STARTED: "VPN client not started",
    ClientState.STARTED: "VPN client started",
    ClientState.STOPPED: "VPN client stopped",
    ClientState.CONN_LOST: "VPN client lost connection",
    ClientState.STARTING: "VPN client starting",
}


def new_machine() -> Machine[ClientState, ClientInput]:
    return Machine("client", ClientState.NOT_STARTED, TRANSITIONS)
