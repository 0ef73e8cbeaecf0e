"""``cellvpn-ctl ledger --socket``: ledger commands run by a live server on its own ledger,
the server's metrics over real HTTP, and ``ledger receipts --local`` from a client's record.

The server runs in this process on the real reactor (billing on, no TUN); cellvpn-ctl runs as
a subprocess, started with the reactor's process support so the reactor keeps serving.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue

from cellvpn.billing.keys import KeyPair, load_key
from cellvpn.cli.viasocket import NO_LEDGER
from cellvpn.client.receipts import ReceiptBook
from cellvpn.config import load_client_config, load_server_config
from cellvpn.control.service import ControlService
from cellvpn.lab import VENV_BIN
from cellvpn.server.service import VPNServerService
from cellvpn.wire.receipt import Receipt, ReceiptInfo, Unit

pytestmark = pytest.mark.timeout(120)

CLIENT = KeyPair.from_seed(hashlib.sha3_256(b"socket test client").digest())


class Ctl:
    """cellvpn-ctl in a subprocess of the running reactor."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd

    async def run(self, *args: str) -> tuple[int, str, str]:
        out, err, code = await getProcessOutputAndValue(
            str(VENV_BIN / "cellvpn-ctl"), args, env=dict(os.environ), path=str(self.cwd)
        )
        return code, out.decode(), err.decode()

    async def ok(self, *args: str) -> str:
        code, out, err = await self.run(*args)
        assert code == 0 and err == "", err
        return out

    async def json(self, *args: str) -> Any:
        return json.loads(await self.ok(*args, "--json"))

    async def refused(self, *args: str) -> str:
        code, out, err = await self.run(*args)
        assert code == 2 and out == "", out
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        return lines[0]


class Running:
    def __init__(self, service: VPNServerService, tmp_path: Path) -> None:
        self.service = service
        self.socket = str(tmp_path / "server.sock")
        self.url = f"sqlite:///{tmp_path / 'state' / 'ledger.db'}"
        self.ctl = Ctl(tmp_path)
        assert service.billing is not None
        self.provider = service.billing.key

    def metrics_url(self, path: str) -> str:
        port = self.service.metrics_port.getHost().port
        return f"http://127.0.0.1:{port}{path}"


@pytest_twisted.async_yield_fixture()
async def server(tmp_path: Path, reactor: Any) -> AsyncIterator[Running]:
    config = load_server_config(
        None,
        {
            "server.listen": "tcp:0:interface=127.0.0.1",
            "server.state_dir": str(tmp_path / "state"),
            "control.socket": str(tmp_path / "server.sock"),
            "metrics.listen": "tcp:0:interface=127.0.0.1",
            "srv_vpn.enabled": "false",
            "billing.price": "10",
        },
    )
    service = VPNServerService(config, reactor)
    service.privilegedStartService()
    service.startService()
    assert service.ledger is not None
    await service.ledger.orders()  # billing's start (its order) is done: calls run in order
    try:
        yield Running(service, tmp_path)
    finally:
        await service.stopService()


def _fetch(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["content-type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["content-type"], e.read()


async def http_get(url: str) -> tuple[int, str, bytes]:
    """A plain HTTP client of its own (urllib, on a thread): the reactor keeps serving."""
    result: tuple[int, str, bytes] = await deferToThread(_fetch, url)
    return result


@pytest_twisted.ensureDeferred
async def test_balance_and_mint_through_the_socket(server: Running, tmp_path: Path) -> None:
    """Both spellings of --socket; a key file is read by the ctl and only its id is sent; the
    answers are those of --ledger, text and JSON."""
    ctl = server.ctl
    assert (await ctl.ok("ledger", "keygen", "client.key")).startswith("created key client.key")
    client = load_key(tmp_path / "client.key")

    out = await ctl.ok("ledger", "--socket", server.socket, "mint", "client.key", "700")
    assert out == f"minted 700 datoshi to {client.account_hex}; balance 700\n"
    big = str(10**30)
    assert await ctl.json("--socket", server.socket, "ledger", "mint", client.account_hex, big) == {
        "account": client.account_hex,
        "minted": big,
        "balance": str(10**30 + 700),
    }
    through_socket = await ctl.ok("--socket", server.socket, "ledger", "balance", "client.key")
    local = await ctl.ok("ledger", "--ledger", server.url, "balance", "client.key")
    balance = f"account {client.account_hex}: balance {10**30 + 700} datoshi\n"
    assert through_socket == local == balance
    assert await ctl.json("ledger", "balance", client.account_hex, "--socket", server.socket) == {
        "account": client.account_hex,
        "balance": str(10**30 + 700),
    }
    # the server's own order, published at start, is there too
    orders = await ctl.json("ledger", "--socket", server.socket, "order", "list")
    [order] = orders["orders"]
    assert order["provider"] == server.provider.account_hex and order["price"] == "10"


@pytest_twisted.ensureDeferred
async def test_report_and_get_limits_and_remain_limits(server: Running, reactor: Any) -> None:
    """What the server saved for a client: `report` and `get_limits` through the socket, and
    /remain_limits_vpn over HTTP, all from the server's ledger."""
    ledger = server.service.ledger
    assert ledger is not None
    provider = server.provider
    await ledger.save_limits(provider.account, CLIENT.account, 5000, 1800.5, time.time())
    await ledger.add_usage(provider.account, CLIENT.account, "paid", 600.0, 123456, 100)
    await ledger.add_usage(provider.account, CLIENT.account, "grace", 60.0, 1000, 0)
    ctl = server.ctl

    limits = await ctl.json(
        "ledger", "--socket", server.socket, "get_limits",
        "--provider", provider.account_hex, "--client", CLIENT.account_hex,
    )  # fmt: skip
    assert limits["sec"] == 1800.5 and limits["bytes"] == 5000
    assert limits["provider"] == provider.account_hex and limits["client"] == CLIENT.account_hex
    local = await ctl.json(
        "ledger", "--ledger", server.url, "get_limits",
        "--provider", provider.account_hex, "--client", CLIENT.account_hex,
    )  # fmt: skip
    assert limits == local

    report = await ctl.json("--socket", server.socket, "ledger", "report")
    [row] = report["report"]
    assert row["client"] == CLIENT.account_hex
    assert row["paid"] == {"seconds": 600.0, "bytes": 123456, "value": "100"}
    assert row["grace"]["seconds"] == 60.0 and row["free"]["bytes"] == 0
    text = await ctl.ok("--socket", server.socket, "ledger", "report")
    assert text == await ctl.ok("ledger", "--ledger", server.url, "report")

    code, ctype, body = await http_get(
        server.metrics_url(
            f"/remain_limits_vpn?net_id=4660&user_pkey_hash=0x{CLIENT.account_hex.upper()}"
        ),
    )
    assert code == 200 and ctype == "application/json"
    assert json.loads(body) == {
        "net_id": 4660,
        "srv_uid": 1,
        "user_pkey_hash": CLIENT.account_hex,
        "server_pkey_hash": provider.account_hex,
        "limit_bytes": 5000,
        "limit_sec": 1800,
    }
    code, _, body = await http_get(
        server.metrics_url(f"/remain_limits_vpn?net_id=1&user_pkey_hash={'0' * 64}")
    )
    assert code == 200 and json.loads(body)["limit_bytes"] == 0
    code, _, body = await http_get(server.metrics_url("/remain_limits_vpn?net_id=x"))
    assert code == 400 and "net_id" in json.loads(body)["error"]


@pytest_twisted.ensureDeferred
async def test_metrics_over_http(server: Running, reactor: Any) -> None:
    """/metrics speaks the text format with billing's counters; other paths are a plain 404."""
    code, ctype, body = await http_get(server.metrics_url("/metrics"))
    assert code == 200 and ctype == "text/plain; version=0.0.4; charset=utf-8"
    text = body.decode()
    assert "# TYPE cellvpn_billing_receipts_redeemed_total counter\n" in text
    assert "\ncellvpn_billing_receipts_redeemed_total 0.0\n" in text
    assert "\ncellvpn_sessions_active 0.0\n" in text
    assert "\nprocess_open_fds " in text
    code, _, body = await http_get(server.metrics_url("/nothing"))
    assert code == 404 and b"Traceback" not in body


@pytest_twisted.ensureDeferred
async def test_refusals_are_one_line(server: Running) -> None:
    """A ledger refusal reads as with --ledger; what cannot run in a server says why."""
    ctl = server.ctl
    sock = server.socket
    missing = "ab" * 32
    assert await ctl.refused("ledger", "--socket", sock, "deposit", "show", missing) == (
        f"cellvpn-ctl: ledger refused: TX_COND_NOT_FOUND (0x400): no deposit {missing}"
    )
    assert await ctl.refused("ledger", "--socket", sock, "mint", missing, "0") == (
        "cellvpn-ctl: VALUE must be positive"
    )
    assert await ctl.refused("ledger", "--socket", sock, "balance", "nope.key") == (
        "cellvpn-ctl: account 'nope.key' is neither 64 hex digits nor a key file"
    )
    assert await ctl.refused("ledger", "--socket", sock, "keygen", "x.key") == (
        "cellvpn-ctl: keygen writes a key file on this host: run it without --socket"
    )
    line = await ctl.refused(
        "ledger", "--socket", sock, "deposit", "create", "--key", "x.key", "--value", "1",
        "--unit", "SEC", "--max-unit-price", "1",
    )  # fmt: skip
    assert line.startswith("cellvpn-ctl: deposit create signs with a private key")
    assert await ctl.refused(
        "ledger", "--socket", sock, "--ledger", server.url, "balance", missing
    ) == ("cellvpn-ctl: --ledger and --socket name two ledgers: give one")
    assert not (server.ctl.cwd / "x.key").exists()


@pytest_twisted.ensureDeferred
async def test_the_server_checks_what_it_is_sent(server: Running) -> None:
    """A caller other than cellvpn-ctl gets the same refusals from the server itself; the
    server opens no file a caller names."""
    from cellvpn.control.commands import ControlError

    service = server.service

    async def refusal(argv: Any) -> str:
        with pytest.raises(ControlError) as e:
            await service.control_ledger(argv)
        return str(e.value)

    key = str(server.ctl.cwd / "state" / "provider.key")
    assert "is its id (64 hex digits)" in await refusal(["balance", key])
    assert "is its id (64 hex digits)" in await refusal(["order", "list", "--provider", key])
    assert await refusal(["keygen", "k"]) == (
        "keygen writes a key file on this host: run it without --socket"
    )
    assert "signs with a private key" in await refusal(
        ["deposit", "close", "ab" * 32, "--key", key]
    )
    assert "the following arguments are required" in await refusal(["balance"])
    assert "invalid choice" in await refusal(["nonsense"])
    assert await refusal("balance") == "argv must be a list of strings"
    assert await refusal(["receipts", "--local"]) == (
        "receipts --local reads a client's own record, not a server's ledger"
    )
    answer = await service.control_ledger(["balance", CLIENT.account_hex])
    assert answer == {
        "result": {"account": CLIENT.account_hex, "balance": "0"},
        "text": f"account {CLIENT.account_hex}: balance 0 datoshi",
    }


@pytest_twisted.ensureDeferred
async def test_a_server_without_billing_says_so(server: Running) -> None:
    """No ledger in the server: one clear line."""
    service = server.service
    ledger, service.ledger = service.ledger, None
    try:
        line = await server.ctl.refused("--socket", server.socket, "ledger", "report")
    finally:
        service.ledger = ledger
    assert line == f"cellvpn-ctl: {NO_LEDGER}"


# --- receipts --local ----------------------------------------------------------------------


def write_record(state_dir: Path) -> tuple[Receipt, Receipt, bytes]:
    """A client's record: two receipts signed on one deposit, the first one confirmed."""
    provider = KeyPair.from_seed(hashlib.sha3_256(b"socket test provider").digest())
    deposit = hashlib.sha3_256(b"socket test deposit").digest()
    book = ReceiptBook(state_dir / "receipts.jsonl")
    first = Receipt(ReceiptInfo(1, Unit.SEC, 60, 120, deposit))
    first = first.with_signature(provider.signature(first.info_bytes))
    first = first.with_signature(CLIENT.signature(first.info_bytes))
    book.signed(deposit, first, provider.account)
    book.confirmed(deposit, first.hash)
    second = Receipt(ReceiptInfo(1, Unit.SEC, 60, 120, first.hash))
    second = second.with_signature(provider.signature(second.info_bytes))
    second = second.with_signature(CLIENT.signature(second.info_bytes))
    book.signed(deposit, second, provider.account)
    return first, second, deposit


@pytest_twisted.ensureDeferred
async def test_local_receipts_from_the_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "client-state"
    first, second, deposit = write_record(state)
    ctl = Ctl(tmp_path)
    answer = await ctl.json("ledger", "receipts", "--local", "--state-dir", str(state))
    assert [r["hash"] for r in answer["receipts"]] == [first.hash.hex(), second.hash.hex()]
    one = answer["receipts"][0]
    assert one["deposit"] == deposit.hex() and one["prev"] == deposit.hex()
    assert one["units"] == 60 and one["unit"] == "SEC" and one["value"] == "120"
    assert one["confirmed"] is True and answer["receipts"][1]["confirmed"] is False
    assert answer["receipts"][1]["prev"] == first.hash.hex()
    assert isinstance(one["time"], float)
    assert answer["signed"] == 2 and answer["confirmed"] == 1
    assert answer["total"] == "240" and answer["confirmed_total"] == "120"

    text = (await ctl.ok("ledger", "receipts", "--local", "--state-dir", str(state))).splitlines()
    assert len(text) == 3
    assert (
        text[0]
        .split(" ", 1)[1]
        .startswith(f"receipt {first.hash.hex()}: deposit {deposit.hex()}, 60 SEC for 120 datoshi")
    )
    assert text[0].endswith(f"prev {deposit.hex()}, confirmed")
    assert text[1].endswith(f"prev {first.hash.hex()}, not confirmed")
    assert text[2] == "2 receipt(s) signed, 1 confirmed; 240 datoshi signed, 120 confirmed"

    only = await ctl.json(
        "ledger", "receipts", "--local", "--state-dir", str(state), "--deposit", "cd" * 32
    )
    assert only["receipts"] == [] and only["total"] == "0"
    none = await ctl.ok("ledger", "receipts", "--local", "--state-dir", str(tmp_path / "no"))
    assert none == f"no receipts: {tmp_path / 'no' / 'receipts.jsonl'} does not exist\n"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "receipts.jsonl").write_text("not json\n")
    line = await ctl.refused("ledger", "receipts", "--local", "--state-dir", str(tmp_path / "bad"))
    assert line.startswith(f"cellvpn-ctl: {tmp_path / 'bad' / 'receipts.jsonl'} is not a receipt")
    assert await ctl.refused("ledger", "receipts", "--state-dir", str(state)) == (
        "cellvpn-ctl: --state-dir goes with --local"
    )


@pytest_twisted.ensureDeferred
async def test_local_receipts_through_the_clients_socket(tmp_path: Path, reactor: Any) -> None:
    """``--socket`` with ``--local`` asks the running client (its control_local_receipts)."""
    from cellvpn.client.service import VPNClientService

    state = tmp_path / "client-state"
    first, second, _ = write_record(state)
    sock = tmp_path / "client.sock"
    config = load_client_config(None, {"client.state_dir": str(state), "control.socket": str(sock)})
    client = VPNClientService(config, reactor)
    assert client.control_local_receipts()[0]["receipt"] == first.hash.hex()
    control = ControlService(sock, client, reactor)
    control.privilegedStartService()
    control.startService()
    try:
        ctl = Ctl(tmp_path)
        answer = await ctl.json("ledger", "receipts", "--local", "--socket", str(sock))
        assert [r["hash"] for r in answer["receipts"]] == [first.hash.hex(), second.hash.hex()]
        assert answer["record"] == f"the client at {sock}"
        line = await ctl.refused(
            "ledger", "receipts", "--local", "--socket", str(sock), "--state-dir", str(state)
        )
        assert line == "cellvpn-ctl: --socket and --state-dir name two records: give one"
    finally:
        await control.stopService()
