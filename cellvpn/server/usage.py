"""A session's usage: whether the service is granted, and on what terms.

States and numbers are the original's (``dap_chain_net_srv_usage``): IDLE 0, GRACE 1,
NORMAL 2, ERROR 3, FREE 4. Channel 'S' carries traffic only in GRACE, NORMAL and FREE.
"""

from __future__ import annotations

from enum import Enum, IntEnum

from cellvpn.fsm import Machine


class UsageState(IntEnum):
    IDLE = 0
    GRACE = 1
    NORMAL = 2
    ERROR = 3
    FREE = 4


class UsageInput(Enum):
    GRANT_FREE = "grant-free"  # REQUEST accepted as free service
    GRANT_GRACE = "grant-grace"  # paid REQUEST whose deposit is not in the ledger yet
    PAID = "paid"  # a receipt was redeemed (or saved limits restored)
    REFUSE = "refuse"  # REQUEST refused, grace ran out, or a receipt failed
    STOP = "stop"  # limits used up: NOTIFY_STOPPED


_S, _I = UsageState, UsageInput
TRANSITIONS: dict[tuple[UsageState, UsageInput], UsageState] = {
    (_S.IDLE, _I.GRANT_FREE): _S.FREE,
    (_S.IDLE, _I.GRANT_GRACE): _S.GRACE,
    (_S.IDLE, _I.PAID): _S.NORMAL,
    (_S.IDLE, _I.REFUSE): _S.ERROR,
    (_S.GRACE, _I.PAID): _S.NORMAL,
    (_S.GRACE, _I.REFUSE): _S.ERROR,
    (_S.NORMAL, _I.PAID): _S.NORMAL,
    (_S.NORMAL, _I.REFUSE): _S.ERROR,
    (_S.NORMAL, _I.STOP): _S.ERROR,
    (_S.GRACE, _I.STOP): _S.ERROR,
}
del _S, _I

#: States in which channel 'S' passes traffic.
ACTIVE = frozenset({UsageState.GRACE, UsageState.NORMAL, UsageState.FREE})


def new_usage() -> Machine[UsageState, UsageInput]:
    return Machine("usage", UsageState.IDLE, TRANSITIONS)
