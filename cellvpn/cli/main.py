"""``cellvpn-ctl``: talk to a running cellvpn service over its control socket."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cellvpn import __version__
from cellvpn.cli.configcheck import add_config_commands
from cellvpn.cli.control import CtlError, call
from cellvpn.cli.ledger import add_ledger_commands
from cellvpn.control import text

SERVER_SOCKET = "/run/cellvpn/server.sock"
CLIENT_SOCKET = "/run/cellvpn/client.sock"


def _print_server_status(result: dict[str, Any]) -> None:
    sessions = result.get("sessions", [])
    print(f"cellvpn server on {result.get('listen')}: {len(sessions)} session(s)")
    for s in sessions:
        rtt = s.get("rtt_ms")
        print(
            f"  session {s['session_id']:#010x} {s['peer']}: keepalives "
            f"{s['keepalives_sent']} sent / {s['alives_received']} answered, "
            f"{s['keepalives_received']} received"
            + (f", rtt {rtt:.2f} ms" if rtt is not None else "")
        )


def _emit(ns: argparse.Namespace, result: Any, text: str) -> None:
    if ns.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(text)


def _exit_code(code: int) -> int:
    """A return code of the original as an exit status: -1 is 255, -2 is 254, -3 is 253."""
    return code & 0xFF


Handler = Callable[[argparse.Namespace], int]


def _status(ns: argparse.Namespace) -> int:
    sock = ns.socket or _default_socket()
    result = call(sock, "status", {})
    if ns.json:
        _emit(ns, result, "")
    elif result.get("role") == "client":
        print(text.client_status(result))
    else:
        _print_server_status(result)
    return 0


def _vpn_client(ns: argparse.Namespace) -> int:
    sock = ns.socket or CLIENT_SOCKET
    if ns.action == "status":
        result = call(sock, "status", {})
        _emit(ns, result, text.client_status(result))
        return 0
    if ns.action == "start":
        if ns.addr is None:
            raise CtlError("VPN server address not defined, use -addr <server_address>", 255)
        if ns.port is None:
            raise CtlError("VPN server port not defined, use -port <server_port>", 255)
        answer = call(sock, "vpn_client_start", {"addr": ns.addr, "port": ns.port}, timeout=60)
        code = int(answer["code"])
        words = text.START_TEXT.get(code, "Can't start VPN client")
        reason = answer["status"].get("last_error")
        if code < 0 and reason:
            words += f"\n{reason}"
        _emit(ns, {"code": code, "text": words, **answer}, words)
        return _exit_code(code)
    if ns.action == "check":
        return _vpn_client_check(ns, sock)
    answer = call(sock, "vpn_client_stop", {}, timeout=60)
    code = int(answer["code"])
    words = text.STOP_TEXT.get(code, "VPN client not stopped")
    _emit(ns, {"code": code, "text": words, **answer}, words)
    return _exit_code(code)


def _vpn_client_check(ns: argparse.Namespace, sock: str) -> int:
    """``vpn_client check -addr A -port P``: run by the client, which times the answer."""
    if ns.addr is None:
        raise CtlError("VPN server address not defined, use -addr <server_address>", 255)
    if ns.port is None:
        raise CtlError("VPN server port not defined, use -port <server_port>", 255)
    args = {"addr": ns.addr, "port": ns.port, "size": ns.size, "timeout": ns.timeout}
    answer = call(sock, "vpn_client_check", args, timeout=ns.timeout + 30)
    code = int(answer["code"])
    words = text.CHECK_TEXT.get(code, "Can't check VPN server")
    if code == 0:
        words += "\n" + text.check_figures(answer)
    elif answer.get("reason"):
        words += f"\n{answer['reason']}"
    _emit(ns, {"text": words, **answer}, words)
    return _exit_code(code)


def _vpn_stat(ns: argparse.Namespace) -> int:
    sock = ns.socket or SERVER_SOCKET
    result = call(sock, "vpn_stat", {"full": ns.full})
    sessions = result["sessions"] + result.get("ended", [])
    _emit(ns, result, text.vpn_stat(sessions, full=ns.full))
    return 0


def _default_socket() -> str:
    import os

    for path in (CLIENT_SOCKET, SERVER_SOCKET):
        if os.path.exists(path):
            return path
    return CLIENT_SOCKET


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellvpn-ctl", description="Control a running cellvpn server or client."
    )
    parser.add_argument("--version", action="version", version=f"cellvpn {__version__}")
    parser.add_argument("--socket", help="control socket of the service to talk to")
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")
    # The same two options after the command too (``vpn_stat --json``); SUPPRESS keeps a
    # value given before the command when the command's parser does not see the option.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the answer as JSON"
    )
    common.add_argument(
        "--socket", default=argparse.SUPPRESS, help="control socket of the service to talk to"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("status", help="the service's stream status", parents=[common])
    p.set_defaults(handler=_status)
    p = sub.add_parser("vpn_client", help="start, stop or ask the VPN client", parents=[common])
    p.add_argument("action", choices=["start", "stop", "status", "check"])
    p.add_argument("-addr", help="server address (start, check)")
    p.add_argument("-port", type=int, help="server port (start, check)")
    p.add_argument(
        "-size", type=int, default=10240, help="check: bytes sent and asked for (at most 10240)"
    )
    p.add_argument(
        "-timeout", type=float, default=10.0, help="check: seconds to wait for the answer"
    )
    p.add_argument("-net", help="accepted for compatibility with the node CLI; ignored")
    p.set_defaults(handler=_vpn_client)
    p = sub.add_parser("vpn_stat", help="the server's VPN sessions", parents=[common])
    p.add_argument("-full", action="store_true", help="more per session, and ended sessions")
    p.add_argument("-net", help="accepted for compatibility with the node CLI; ignored")
    p.set_defaults(handler=_vpn_stat)
    add_config_commands(sub, common)
    add_ledger_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    ns.ctl_argv = list(sys.argv[1:] if argv is None else argv)  # sent on by ledger --socket
    handler: Handler | None = getattr(ns, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(ns)
    except CtlError as e:
        print(f"cellvpn-ctl: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
