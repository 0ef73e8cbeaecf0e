"""``cellvpn-ctl ledger ...`` as a user runs it, on a ledger file of its own."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from cellvpn.billing.keys import load_key
from cellvpn.billing.sqlite import SqliteLedger
from cellvpn.lab import VENV_BIN

from .helpers import chain

pytestmark = pytest.mark.timeout(120)


class Ctl:
    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.url = f"sqlite:///{tmp_path}/ledger.db"

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_BIN / "cellvpn-ctl"), *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.dir,
        )

    def ok(self, *args: str) -> str:
        done = self.run("ledger", "--ledger", self.url, *args)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        return done.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def refused(self, *args: str) -> str:
        done = self.run("ledger", "--ledger", self.url, *args)
        assert done.returncode == 2, done.stdout
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        return lines[0]


@pytest.fixture
def ctl(tmp_path: Path) -> Ctl:
    return Ctl(tmp_path)


def test_the_whole_life_of_a_deposit(ctl: Ctl, tmp_path: Path) -> None:
    out = ctl.ok("keygen", "client.key")
    client = load_key(tmp_path / "client.key")
    assert stat.S_IMODE(os.stat(tmp_path / "client.key").st_mode) == 0o600
    assert out == f"created key client.key (mode 0600)\naccount {client.account_hex}\n"
    provider = ctl.json("keygen", "provider.key")
    assert provider["account"] == load_key(tmp_path / "provider.key").account_hex

    assert ctl.ok("mint", client.account_hex, "5000") == (
        f"minted 5000 datoshi to {client.account_hex}; balance 5000\n"
    )
    big = str(10**30)
    assert ctl.json("mint", "provider.key", big) == {
        "account": provider["account"],
        "minted": big,
        "balance": big,
    }
    assert ctl.json("balance", "client.key") == {
        "account": client.account_hex,
        "balance": "5000",
    }

    order = ctl.json(
        "order", "create", "--key", "provider.key", "--price", "60", "--unit", "SEC",
        "--units", "60", "--token", "KEL",
    )  # fmt: skip
    assert (
        order["unit"] == "SEC"
        and order["price"] == "60"
        and order["provider"] == provider["account"]
    )
    listed = ctl.ok("order", "list")
    assert listed.startswith(f"order {order['hash']}: 60 datoshi of KEL for 60 SEC")
    assert ctl.json("order", "list", "--provider", "client.key") == {"orders": []}

    dep = ctl.json(
        "deposit", "create", "--key", "client.key", "--value", "1000", "--unit", "sec",
        "--max-unit-price", "2", "--expires", "3600",
    )  # fmt: skip
    assert dep["locked"] == "1000" and dep["owner_balance"] == "4000"
    assert dep["state_hash"] == dep["id"] and dep["unit"] == "SEC"
    assert dep["expires"] - time.time() == pytest.approx(3600, abs=60)

    # The server's part, through the library: redeem three receipts, save limits, add usage.
    ledger = SqliteLedger(tmp_path / "ledger.db", create=False)
    prov_key = load_key(tmp_path / "provider.key")
    dep_id = bytes.fromhex(dep["id"])
    for r in chain(prov_key, client, dep_id, 3, value=100):
        ledger.redeem(r, dep_id, prov_key.public, time.time())
    # the server's save of the deposit's use: 1234 bytes and 42 s left of it
    ledger.save_limits(prov_key.account, client.account, 1234, 42.0, time.time(), dep_id)
    ledger.add_usage(prov_key.account, client.account, "paid", 180, 5000, 300)
    ledger.add_usage(prov_key.account, client.account, "grace", 60, 700, 0)
    ledger.close()

    listed = ctl.json("deposit", "list", "--owner", "client.key")["deposits"]
    assert [d["id"] for d in listed] == [dep["id"]] and listed[0]["locked"] == "700"
    assert ctl.ok("deposit", "list", "--owner", "provider.key") == "no deposits\n"
    assert ctl.ok("deposit", "list").startswith(f"deposit {dep['id']}: open, 700 of 1000 locked")
    shown = ctl.json("deposit", "show", dep["id"])
    assert shown["locked"] == "700" and shown["receipts"] == 3 and not shown["closed"]
    text = ctl.ok("deposit", "show", dep["id"])
    assert text.startswith(f"deposit {dep['id']} (open)\n")
    assert "  locked.............700 of 1000\n" in text

    receipts = ctl.json("receipts", "--deposit", dep["id"])
    assert [r["seq"] for r in receipts["receipts"]] == [1, 2, 3]
    assert receipts["total"] == "300"
    assert ctl.ok("receipts", "--client", "client.key").endswith("3 receipt(s), 300 datoshi\n")

    report = ctl.json("report")["report"]
    assert report == [
        {
            "provider": prov_key.account_hex,
            "client": client.account_hex,
            "paid": {"seconds": 180.0, "bytes": 5000, "value": "300"},
            "grace": {"seconds": 60.0, "bytes": 700, "value": "0"},
            "free": {"seconds": 0.0, "bytes": 0, "value": "0"},
        }
    ]
    text = ctl.ok("report")
    assert (
        f"client {client.account_hex}" in text
        and "  paid...............180 s, 5000 bytes, 300 datoshi" in text
    )

    limits = ctl.json("get_limits", "--provider", "provider.key", "--client", client.account_hex)
    assert (limits["sec"], limits["bytes"]) == (42.0, 1234)
    none = ctl.ok("get_limits", "--provider", client.account_hex, "--client", "provider.key")
    assert none.startswith("no saved limits")

    closed = ctl.json("deposit", "close", dep["id"], "--key", "client.key")
    assert closed == {
        "deposit": dep["id"],
        "returned": "700",
        "owner": client.account_hex,
        "balance": "4700",
    }
    line = ctl.refused("deposit", "close", dep["id"], "--key", "client.key")
    assert line == (
        f"cellvpn-ctl: ledger refused: TX_COND_NOT_FOUND (0x400): deposit {dep['id']} is closed"
    )


def test_options_after_the_action_and_global_json(ctl: Ctl, tmp_path: Path) -> None:
    ctl.ok("keygen", "a.key")
    a = load_key(tmp_path / "a.key")
    ctl.ok("mint", "a.key", "7")
    done = ctl.run("--json", "ledger", "balance", a.account_hex, "--ledger", ctl.url)
    assert done.returncode == 0 and json.loads(done.stdout)["balance"] == "7"


def test_errors_are_one_line_with_status_2(ctl: Ctl, tmp_path: Path) -> None:
    missing = ctl.run("ledger", "--ledger", f"sqlite:///{tmp_path}/none.db", "balance", "0" * 64)
    assert missing.returncode == 2
    assert missing.stderr == f"cellvpn-ctl: there is no ledger at {tmp_path}/none.db\n"
    bad_url = ctl.run("ledger", "--ledger", "mysql://x", "balance", "0" * 64)
    assert bad_url.returncode == 2 and "ledger URL 'mysql://x' is not understood" in bad_url.stderr
    ctl.ok("keygen", "c.key")
    ctl.ok("mint", "c.key", "10")
    assert ctl.refused(
        "deposit", "create", "--key", "c.key", "--value", "11", "--unit", "B",
        "--max-unit-price", "1",
    ).startswith("cellvpn-ctl: ledger refused: TX_COND_NOT_ENOUGH (0x402): account ")  # fmt: skip
    assert ctl.refused(
        "deposit", "create", "--key", "c.key", "--value", "5", "--unit", "PCS",
        "--max-unit-price", "1",
    ) == "cellvpn-ctl: unit must be SEC or B, not 'PCS'"  # fmt: skip
    assert ctl.refused("deposit", "show", "xyz") == (
        "cellvpn-ctl: deposit id must be 64 hex digits, not 'xyz'"
    )
    assert ctl.refused("deposit", "show", "ab" * 32) == (
        f"cellvpn-ctl: ledger refused: TX_COND_NOT_FOUND (0x400): no deposit {'ab' * 32}"
    )
    assert ctl.refused("balance", "nobody") == (
        "cellvpn-ctl: account 'nobody' is neither 64 hex digits nor a key file"
    )
    assert ctl.refused("mint", "c.key", "-3") == "cellvpn-ctl: VALUE must be positive"
    os.chmod(tmp_path / "c.key", 0o644)
    assert ctl.refused("balance", "c.key") == (
        "cellvpn-ctl: key file c.key has mode 0644: group and others must have no access to a "
        "private key (chmod 600 c.key)"
    )
    assert ctl.refused("keygen", "c.key") == (
        "cellvpn-ctl: key file c.key already exists; it is never overwritten"
    )
