"""``cellvpn-ctl``: talk to a running cellvpn service over its control socket."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cellvpn import __version__
from cellvpn.cli.configcheck import add_config_commands
from cellvpn.cli.control import CtlError, Watch, call
from cellvpn.cli.fleet import add_fleet_commands
from cellvpn.cli.ledger import add_ledger_commands
from cellvpn.control import text

SERVER_SOCKET = "/run/cellvpn/server.sock"
CLIENT_SOCKET = "/run/cellvpn/client.sock"


def _print_server_status(result: dict[str, Any]) -> None:
    sessions = result.get("sessions", [])
    print(f"cellvpn server on {result.get('listen')}: {len(sessions)} session(s)")
    if result.get("clients"):
        print(f"  clients: {result['clients']}")
    if result.get("server_key"):
        print(f"  server key SHA-256 (pin as server_key): {result['server_key']}")
    if result.get("fingerprint"):
        expires = result.get("certificate_expires")
        until = f", renewed before {text.utc_date(expires)}" if expires else ""
        print(f"  certificate fingerprint: {result['fingerprint']}{until}")
    for s in sessions:
        rtt = s.get("rtt_ms")
        client = f" client {s['client']}" if s.get("client") else ""
        print(
            f"  session {s['session_id']:#010x} {s['peer']}{client}: keepalives "
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
        return _vpn_client_start(ns, sock)
    if ns.action == "check":
        return _vpn_client_check(ns, sock)
    answer = call(sock, "vpn_client_stop", {}, timeout=60)
    code = int(answer["code"])
    words = text.STOP_TEXT.get(code, "VPN client not stopped")
    _emit(ns, {"code": code, "text": words, **answer}, words)
    return _exit_code(code)


def _vpn_client_start(ns: argparse.Namespace, sock: str) -> int:
    """``vpn_client start``: each step it waits for on stderr as it comes (text mode), then
    the original's answer; ``--json`` prints only the final state, steps included."""
    from cellvpn.cli.progress import StepPrinter

    steps = None if ns.json else StepPrinter(sys.stderr)
    watch = Watch("status", {}, steps.seen, 0.1) if steps is not None else None
    args = {"addr": ns.addr, "port": ns.port}
    answer = call(sock, "vpn_client_start", args, timeout=60, watch=watch)
    code = int(answer["code"])
    status = answer["status"]
    if steps is not None and code != 1:  # already started: this start took no steps
        steps.seen(status)
    words = text.START_TEXT.get(code, "Can't start VPN client")
    reason = status.get("last_error")
    if code < 0 and reason:
        words += f"\n{reason}"
    _emit(ns, {"code": code, "text": words, "state": status["status"], **answer}, words)
    return _exit_code(code)


def _check_sizes(ns: argparse.Namespace) -> tuple[int, int, float]:
    """``--send``/``--recv`` (or the older ``-size`` for both) and the timeout in seconds
    (``--timeout`` in ms, or the older ``-timeout`` in seconds)."""
    from cellvpn.client.check import CHECK_TIMEOUT, DEFAULT_RECV, DEFAULT_SEND

    send = ns.send if ns.send is not None else ns.size if ns.size is not None else DEFAULT_SEND
    recv = ns.recv if ns.recv is not None else ns.size if ns.size is not None else DEFAULT_RECV
    if ns.timeout_ms is not None:
        timeout = ns.timeout_ms / 1000
    else:
        timeout = ns.timeout if ns.timeout is not None else CHECK_TIMEOUT
    return send, recv, timeout


def _vpn_client_check(ns: argparse.Namespace, sock: str) -> int:
    """``vpn_client check -addr A -port P``: run by the client, which times the answers."""
    import secrets

    from cellvpn.cli.progress import TerminalBar

    if ns.what == "result":
        return _vpn_client_check_result(ns, sock)
    if ns.addr is None:
        raise CtlError("VPN server address not defined, use -addr <server_address>", 255)
    if ns.port is None:
        raise CtlError("VPN server port not defined, use -port <server_port>", 255)
    send, recv, timeout = _check_sizes(ns)
    token = secrets.token_hex(8)
    args = {
        "addr": ns.addr,
        "port": ns.port,
        "send": send,
        "recv": recv,
        "timeout": timeout,
        "probes": ns.probes,
        "token": token,
    }
    bar = TerminalBar(sys.stdout) if sys.stdout.isatty() else None
    watch = None
    if bar is not None:
        watch = Watch("vpn_client_check_progress", {"token": token}, bar.draw, 0.1)
    try:
        answer = call(sock, "vpn_client_check", args, timeout=timeout + 30, watch=watch)
    finally:
        if bar is not None:
            bar.clear()
    code = int(answer["code"])
    words = text.CHECK_TEXT.get(code, "Can't check VPN server")
    if code == 0:
        words += "\n" + text.check_figures(answer)
    elif answer.get("reason"):
        words += f"\n{answer['reason']}"
    _emit(ns, {"text": words, **answer}, words)
    return _exit_code(code)


def _vpn_client_check_result(ns: argparse.Namespace, sock: str) -> int:
    """``vpn_client check result``: each server known, Available / Not available / Unknown."""
    answer = call(sock, "vpn_client_check_result", {})
    _emit(ns, answer, text.check_results(answer["servers"]))
    return 0


def _vpn_stat(ns: argparse.Namespace) -> int:
    sock = ns.socket or SERVER_SOCKET
    result = call(sock, "vpn_stat", {"full": ns.full})
    sessions = result["sessions"] + result.get("ended", [])
    _emit(ns, result, text.vpn_stat(sessions, full=ns.full))
    return 0


def _client(ns: argparse.Namespace) -> int:
    """``client add | list | revoke``: enrolled clients, through the server's control socket."""
    sock = ns.socket or SERVER_SOCKET
    if ns.action == "add":
        return _client_add(ns, sock)
    if ns.action == "list":
        result = call(sock, "client_list", {})
        _emit(ns, result, text.client_list(result["clients"]))
        return 0
    if ns.name is None:
        raise CtlError("client revoke needs the client's NAME")
    result = call(sock, "client_revoke", {"name": ns.name})
    closed = result["sessions_closed"]
    serials = ", ".join(r["serial"] for r in result["revoked"])
    words = f"revoked client {ns.name} (certificate {serials}); " + (
        f"closed {len(closed)} live session(s): " + ", ".join(f"{s:#010x}" for s in closed)
        if closed
        else "it had no live session"
    )
    _emit(ns, result, words)
    return 0


def _client_add(ns: argparse.Namespace, sock: str) -> int:
    import os
    from pathlib import Path

    from cellvpn.conn import pki
    from cellvpn.enroll import EnrollFileError, client_file, qr_text, write_private

    if ns.name is None:
        raise CtlError("client add needs the client's NAME")
    if ns.out is None and not ns.qr:
        raise CtlError("client add needs --out FILE (or --qr) for the client's config")
    out = Path(ns.out) if ns.out else None
    if out is not None and out.exists() and not ns.force:
        raise CtlError(f"{out} exists already (--force replaces it)")
    folder = out.parent if out is not None else None
    if folder is not None and not (folder.is_dir() and os.access(folder, os.W_OK)):
        # checked before the server signs: a certificate nobody holds would block the name
        raise CtlError(f"cannot write {out}: {folder} is not a folder this user may write to")
    try:
        request = pki.new_client_request(ns.name)
    except pki.EnrollmentError as e:
        raise CtlError(str(e)) from None
    answer = call(
        sock,
        "client_sign",
        {"name": ns.name, "csr": request.csr_pem.decode("ascii"), "days": ns.days},
    )
    config = client_file(ns.name, answer, request.key_pem)
    try:
        if out is not None:
            write_private(out, config, replace=ns.force)
        picture = qr_text(config) if ns.qr else None
    except EnrollFileError as e:
        raise CtlError(str(e)) from None
    until = text.utc_date(float(answer["not_after"]))
    words = f"enrolled client {ns.name}: certificate {answer['serial']} until {until}"
    if out is not None:
        words += (
            f"\nwrote {out} (mode 0600; it holds the client's key)"
            f"\nstart the client with: twistd cellvpn-client --config {out}"
        )
    result = {k: v for k, v in answer.items() if k not in ("certificate", "ca")}
    result["file"] = str(out) if out is not None else None
    _emit(ns, result, words)
    if picture is not None:
        print(picture, end="")
    return 0


def _session(ns: argparse.Namespace) -> int:
    sock = ns.socket or SERVER_SOCKET
    try:
        session_id = int(ns.id, 0)
    except ValueError:
        raise CtlError(f"{ns.id!r} is not a session id (vpn_stat -full shows them)") from None
    result = call(sock, "session_kick", {"session_id": session_id})
    who = f" (client {result['client']})" if result.get("client") else ""
    _emit(ns, result, f"closed session {session_id:#010x} with {result['peer']}{who}")
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
    p.add_argument(
        "what", nargs="?", choices=["result"], help="check result: the servers' last checks"
    )
    p.add_argument("-addr", help="server address (start, check)")
    p.add_argument("-port", type=int, help="server port (start, check)")
    p.add_argument("--send", type=int, help="check: bytes to upload (262144)")
    p.add_argument("--recv", type=int, help="check: bytes to download (262144)")
    p.add_argument(
        "--timeout", dest="timeout_ms", type=float, help="check: milliseconds for it all (10000)"
    )
    p.add_argument("--probes", type=int, default=5, help="check: round trips timed (5)")
    p.add_argument("-size", type=int, help="check: --send and --recv both (older spelling)")
    p.add_argument("-timeout", type=float, help="check: --timeout in seconds (older spelling)")
    p.add_argument("-H", help="accepted for compatibility with the node CLI; ignored")
    p.add_argument("-net", help="accepted for compatibility with the node CLI; ignored")
    p.set_defaults(handler=_vpn_client)
    p = sub.add_parser("vpn_stat", help="the server's VPN sessions", parents=[common])
    p.add_argument("-full", action="store_true", help="more per session, and ended sessions")
    p.add_argument("-net", help="accepted for compatibility with the node CLI; ignored")
    p.set_defaults(handler=_vpn_stat)
    add_config_commands(sub, common)
    p = sub.add_parser(
        "client",
        parents=[common],
        help="enroll, list or revoke the server's clients",
        description="Enroll a client (its key and request are made here, the server signs "
        "them), list the enrolled clients, or revoke one (its sessions are closed now).",
    )
    p.add_argument("action", choices=["add", "list", "revoke"])
    p.add_argument("name", nargs="?", help="the client's name (add, revoke)")
    p.add_argument(
        "--days", type=int, default=365, help="lifetime of the client certificate (add; 365)"
    )
    p.add_argument("--out", help="write the client's config file here, mode 0600 (add)")
    p.add_argument("--qr", action="store_true", help="print the config as a QR code (add)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file (add)")
    p.set_defaults(handler=_client)
    p = sub.add_parser("session", help="close one of the server's sessions", parents=[common])
    p.add_argument("action", choices=["kick"])
    p.add_argument("id", help="the session id, as vpn_stat shows it (0x0000002a or 42)")
    p.set_defaults(handler=_session)
    add_ledger_commands(sub)
    add_fleet_commands(sub, common)
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
