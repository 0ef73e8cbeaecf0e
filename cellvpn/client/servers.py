"""The servers a client may use, and which one it takes: a sans-IO list and its choice.

The list is ``[client] server`` and ``[client] servers`` (the operator's), and, with
``[client] learn_servers``, the servers the provider's signed offers name: the client asks the
server it is connected to for them (ORDERS on 'R'), keeps only those signed by the provider
whose order it accepted, and stores them in ``state_dir/orders.json`` for its next start.

The choice: servers that are available (a learned offer not stale), whose price is within
``[wallet] max_unit_price`` (a configured server's price is known only once it offers it, so
it is not held against it), by measured round-trip time, then price (an unknown price after
the known ones), then the order given; servers not measured come after those measured. Moving
on after a lost server takes the next one in that order, never the lost one while another is
left.

This is the one place that lists the configured servers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cellvpn.billing.offers import Offer, read_offer
from cellvpn.billing.records import SignedOrder
from cellvpn.config.fields import ParseError
from cellvpn.config.parsers import HOST_PORT, HostPort
from cellvpn.wire.errors import DecodeError

ORDERS_FILE = "orders.json"
_VERSION = 1


@dataclass(frozen=True, slots=True)
class Candidate:
    """One server the client may connect to."""

    host: str
    port: int
    #: datoshi per unit as its offer says; None: a configured server, not known yet
    unit_price: float | None = None
    region: str = ""
    #: when its offer stops being available (unix seconds); None: configured, always
    expires: float | None = None
    #: the server's key (SPKI SHA-256, hex) from its signed offer, if learned
    server_key: str | None = None

    @property
    def endpoint(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _from_offer(offer: Offer) -> Candidate | None:
    try:
        where = HOST_PORT.parse(offer.endpoint, Path("/"))
    except ParseError:
        return None
    return Candidate(
        where.host,
        where.port,
        offer.unit_price,
        offer.region,
        float(offer.order.expires),
        offer.spki,
    )


class ServerList:
    """The configured servers and the learned offers; ``choose`` orders them."""

    def __init__(self, configured: Sequence[HostPort], state_dir: Path | None = None) -> None:
        seen: dict[str, Candidate] = {}
        for hp in configured:
            c = Candidate(hp.host, hp.port)
            seen.setdefault(c.endpoint, c)
        self.configured = list(seen.values())
        self.path = state_dir / ORDERS_FILE if state_dir is not None else None
        self.provider: bytes | None = None
        self.learned: list[Candidate] = []
        self._orders: list[bytes] = []

    # --- learned offers ----------------------------------------------------------------------

    def learn(self, provider: bytes, orders: Iterable[bytes]) -> list[str]:
        """Take the provider's offers (each checked: signed by ``provider``, an endpoint);
        the reasons for those dropped. They replace what was learned before."""
        dropped: list[str] = []
        learned: list[Candidate] = []
        kept: list[bytes] = []
        for raw in orders:
            try:
                offer = read_offer(SignedOrder.decode(raw), provider)
            except DecodeError as e:
                dropped.append(str(e))
                continue
            candidate = _from_offer(offer)
            if candidate is None:
                dropped.append(f"the offer's endpoint {offer.endpoint!r} is not host:port")
                continue
            learned.append(candidate)
            kept.append(raw)
        self.provider, self.learned, self._orders = provider, learned, kept
        return dropped

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": _VERSION,
                "provider": self.provider.hex() if self.provider else None,
                "orders": [o.hex() for o in self._orders],
            }
        )

    def save(self) -> None:
        """Write the learned offers to state_dir (0600, atomically)."""
        if self.path is None:
            return
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def load(self) -> str | None:
        """Read the offers of an earlier run; a reason if the file was unusable (it is then
        ignored: the next ORDERS answer replaces it)."""
        if self.path is None or not self.path.exists():
            return None
        try:
            body = json.loads(self.path.read_text())
            if body.get("version") != _VERSION or body.get("provider") is None:
                return f"{self.path}: not a version {_VERSION} list of offers"
            dropped = self.learn(
                bytes.fromhex(body["provider"]), [bytes.fromhex(o) for o in body["orders"]]
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return f"{self.path}: {e}"
        return f"{self.path}: dropped {len(dropped)} offer(s)" if dropped else None

    # --- the choice --------------------------------------------------------------------------

    def candidates(self, now: float, max_unit_price: int | None) -> list[Candidate]:
        """Every server that may be used now: configured first, then learned ones that are
        available and within the price (one endpoint once)."""
        out: dict[str, Candidate] = {c.endpoint: c for c in self.configured}
        for c in self.learned:
            if c.expires is not None and c.expires <= now:
                continue
            price = c.unit_price
            if max_unit_price is not None and price is not None and price > max_unit_price:
                continue
            if c.endpoint in out and out[c.endpoint].unit_price is None:
                out[c.endpoint] = c  # what its offer says (price, key) is better known
            out.setdefault(c.endpoint, c)
        return list(out.values())

    def choose(
        self,
        now: float,
        max_unit_price: int | None,
        rtts: Mapping[str, float],
        lost: str | None = None,
    ) -> list[Candidate]:
        """The candidates in the order to try them; ``lost`` (a server just given up on) last."""
        pool = self.candidates(now, max_unit_price)
        rank = {c.endpoint: i for i, c in enumerate(pool)}

        def key(c: Candidate) -> tuple[int, int, float, float, int]:
            rtt = rtts.get(c.endpoint)
            return (
                int(c.endpoint == lost),
                int(rtt is None),
                rtt if rtt is not None else 0.0,
                c.unit_price if c.unit_price is not None else float("inf"),
                rank[c.endpoint],
            )

        return sorted(pool, key=key)
