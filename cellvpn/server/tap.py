"""twistd plugin ``cellvpn``: ``Options`` and ``makeService`` for the server."""

from __future__ import annotations

from typing import Any, ClassVar

from twisted.application.service import IService

from cellvpn.config import ServerConfig, load_server_config
from cellvpn.logsetup import twistd_log
from cellvpn.tapsupport import (
    BaseOptions,
    ExitOnStartupError,
    load_or_exit,
    log_warnings,
    shortcut_parameters,
)


class Options(BaseOptions):
    synopsis = "[--config FILE] [--set section.key=value ...]"
    longdesc = (
        "Run the cellvpn server: TLS streams from clients, addresses leased from the pool, "
        "IP packets between the TUN device and the clients. Every key of the config file can "
        "be overridden with --set section.key=value."
    )
    shortcuts: ClassVar[list[tuple[str, str, str]]] = [
        ("listen", "server.listen", "Twisted endpoint to listen on, e.g. tcp:8089"),
        ("state-dir", "server.state_dir", "Folder for the TLS identity, ledger and state"),
        ("network-address", "srv_vpn.network_address", "Lease pool network address"),
        ("network-mask", "srv_vpn.network_mask", "Lease pool netmask"),
        ("tun-name", "srv_vpn.tun_name", "TUN device name"),
        ("control-socket", "control.socket", "Control socket path"),
    ]
    optParameters: ClassVar[list[list[Any]]] = shortcut_parameters(shortcuts)


def makeService(options: Options) -> IService:
    from cellvpn.server.service import VPNServerService

    config = load_or_exit(load_server_config, options)
    log_warnings(config.warnings)
    section = config.server
    overrides = dict(options.overrides)

    def load() -> ServerConfig:
        """The same file (by its absolute path) and overrides, for a reload."""
        return load_server_config(config.source, overrides)

    return ExitOnStartupError(
        VPNServerService(config, owner=run_as(options)),
        load=load,
        service_log=twistd_log(
            getattr(options, "parent", None), section.log_format, section.log_level
        ),
        level_of=lambda c: c.server.log_level,
    )


def run_as(options: Options) -> tuple[int, int] | None:
    """The user and group twistd switches to after the privileged start (``-u``/``-g``), if
    any: the server's state files are handed to them."""
    parent = getattr(options, "parent", None)
    if parent is None:
        return None
    uid, gid = parent.get("uid"), parent.get("gid")
    if uid is None and gid is None:
        return None
    return (-1 if uid is None else int(uid), -1 if gid is None else int(gid))
