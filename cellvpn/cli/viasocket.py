"""``cellvpn-ctl ledger --socket PATH ...``: a ledger command run by a server, on its ledger.

The operator of a running server reaches its ledger through the server's control socket, with
no ledger URL and no second process writing the ledger file. The ctl sends the words after
``ledger``; the server parses them with the very argparse definitions of
:func:`cellvpn.cli.ledger.add_ledger_commands` and runs the same ``cmd_*`` function on the
ledger's own thread, so the answer (text and JSON) is the one ``--ledger`` would print.

Keys never travel: the ctl turns an account given as a key file into its id before sending,
the server refuses any account that is not an id (it opens no file a caller names), and the
commands that sign with a private key (``deposit create``/``close``, ``order create``) and
``keygen`` run only where the key is, with ``--ledger``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from cellvpn.billing.interfaces import ILedger, LedgerUnavailableError
from cellvpn.billing.keys import KeyFileError
from cellvpn.cli.control import CtlError, call
from cellvpn.cli.ledger import (
    _HEX64,
    Answer,
    LedgerCommand,
    LedgerHandler,
    _account_arg,
    _BadArgumentError,
    _guarded,
    add_ledger_commands,
)
from cellvpn.control.commands import ControlError

if TYPE_CHECKING:
    from cellvpn.billing.asyncledger import AsyncLedger

#: The command's attributes that name an account (an id or, on the ctl's side, a key file).
ACCOUNT_ATTRS = ("account", "owner", "provider", "client")
NO_LEDGER = (
    "this server runs without billing ([billing] price = 0), so it has no ledger: "
    "use cellvpn-ctl ledger --ledger URL"
)
BOTH = "--ledger and --socket name two ledgers: give one"
KEYGEN_REFUSAL = "keygen writes a key file on this host: run it without --socket"


def _action(ns: argparse.Namespace) -> str:
    words = [getattr(ns, "ledger_action", None)]
    words += [getattr(ns, "deposit_action", None), getattr(ns, "order_action", None)]
    return " ".join(w for w in words if w) or "ledger"


def socket_refusal(ns: argparse.Namespace) -> str | None:
    """Why this command cannot run in a server (None: it can)."""
    action = _action(ns)
    if action == "keygen":
        return KEYGEN_REFUSAL
    if getattr(ns, "key", None) is not None:
        return (
            f"{action} signs with a private key, which cellvpn-ctl never sends to a server: "
            "run it with --ledger URL instead of --socket"
        )
    if getattr(ns, "local", False):
        return "receipts --local reads a client's own record, not a server's ledger"
    return None


# --- the ctl's side ------------------------------------------------------------------------


def ledger_words(argv: Sequence[str]) -> list[str]:
    """The words after ``ledger``: cellvpn-ctl's own options before it stay here."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "ledger":
            return list(argv[i + 1 :])
        # --socket PATH (argparse takes any unique prefix, such as --sock) takes the next word
        i += 2 if len(word) > 2 and "--socket".startswith(word) else 1
    raise CtlError("no ledger command in the arguments")


def _swap(word: str, value: str, account: str) -> str:
    if word == value:
        return account
    if word.startswith("-") and word.endswith("=" + value):
        return word[: -len(value)] + account
    return word


def with_account_ids(words: list[str], ns: argparse.Namespace) -> list[str]:
    """``words`` with every account given as a key file replaced by its id (read here)."""
    for attr in ACCOUNT_ATTRS:
        value = getattr(ns, attr, None)
        if value is None or _HEX64.fullmatch(value):
            continue
        what = "account" if attr == "account" else f"--{attr}"
        try:
            account = _account_arg(value, what)[0].hex()
        except (_BadArgumentError, KeyFileError) as e:
            raise CtlError(str(e)) from None
        words = [_swap(word, value, account) for word in words]
    return words


def call_server(ns: argparse.Namespace) -> Answer:
    """Run the ledger command of ``ns`` in the server at ``ns.socket``; its answer."""
    why = socket_refusal(ns)
    if why is not None:
        raise CtlError(why)
    if getattr(ns, "ledger", None) is not None:
        raise CtlError(BOTH)
    argv = getattr(ns, "ctl_argv", None)
    words = with_account_ids(ledger_words(sys.argv[1:] if argv is None else argv), ns)
    reply = call(ns.socket, "ledger", {"argv": words})
    if (
        not isinstance(reply, dict)
        or not isinstance(reply.get("result"), dict)
        or not isinstance(reply.get("text"), str)
    ):
        raise CtlError(f"the service at {ns.socket} did not answer with a ledger answer")
    return Answer(reply["result"], reply["text"])


# --- the server's side ---------------------------------------------------------------------


class _ArgvError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser for a server: it raises instead of printing and exiting."""

    def error(self, message: str) -> NoReturn:
        raise _ArgvError(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise _ArgvError((message or "").strip() or f"{self.prog}: nothing to run")

    def _print_message(self, message: str, file: Any = None) -> None:
        """A server prints nothing for its callers (``--help``, say)."""


@functools.cache
def _parser() -> _Parser:
    root = _Parser(prog="cellvpn-ctl", add_help=False)
    add_ledger_commands(root.add_subparsers(dest="command", metavar="COMMAND"))
    return root


def parse_in_server(argv: object) -> tuple[LedgerCommand, argparse.Namespace]:
    """The command and its arguments, checked for a server; ControlError otherwise."""
    if not isinstance(argv, list) or not all(isinstance(w, str) for w in argv):
        raise ControlError("argv must be a list of strings")
    try:
        ns = _parser().parse_args(["ledger", *argv])
    except _ArgvError as e:
        raise ControlError(str(e)) from None
    why = socket_refusal(ns)
    if why is not None:
        raise ControlError(why)
    handler = getattr(ns, "handler", None)
    if not isinstance(handler, LedgerHandler):
        raise ControlError(f"{_action(ns)} cannot run through the control socket")
    if getattr(ns, "ledger", None) is not None:
        raise ControlError(BOTH)
    for attr in ACCOUNT_ATTRS:
        value = getattr(ns, attr, None)
        if value is not None and not _HEX64.fullmatch(value):
            raise ControlError(
                "through the control socket an account is its id (64 hex digits), "
                f"not {value!r}: cellvpn-ctl reads key files on its side"
            )
    return handler.command, ns


def run_in_server(ledger: AsyncLedger | None, argv: object) -> Deferred[dict[str, Any]]:
    """``control_ledger``: parse ``argv``, run the command on the ledger's thread.

    The answer is ``{"result": ..., "text": ...}``; a refusal or bad input is a ControlError
    carrying the line ``--ledger`` would print.
    """
    if ledger is None:
        raise ControlError(NO_LEDGER)
    command, ns = parse_in_server(argv)

    def run(target: ILedger) -> Answer:
        return _guarded(lambda: command(target, ns))

    def refused(failure: Failure) -> Failure:
        if failure.check(CtlError, LedgerUnavailableError):
            raise ControlError(str(failure.value))
        return failure

    d = ledger.run(run, ledger.ledger)
    return d.addCallbacks(lambda a: {"result": a.result, "text": a.text}, refused)
