"""twistd plugin ``cellvpn-client``: ``Options`` and ``makeService`` for the client."""

from __future__ import annotations

from typing import Any, ClassVar

from twisted.application.service import IService

from cellvpn.config import ClientConfig, load_client_config
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
        "Run the cellvpn client: connect to [client] server (or wait for "
        "`cellvpn-ctl vpn_client start`), set up the tunnel and keep it up. Every key of the "
        "config file can be overridden with --set section.key=value."
    )
    shortcuts: ClassVar[list[tuple[str, str, str]]] = [
        ("server", "client.server", "Server to connect to, host:port"),
        ("ca", "client.ca", "PEM file of the CA that signed the server certificate"),
        ("server-key", "client.server_key", "SHA-256 of the server's public key (SPKI)"),
        ("fingerprint", "client.fingerprint", "SHA-256 fingerprint of the server certificate"),
        ("tun-name", "client.tun_name", "TUN device name"),
        ("control-socket", "control.socket", "Control socket path"),
    ]
    optParameters: ClassVar[list[list[Any]]] = shortcut_parameters(shortcuts)


def makeService(options: Options) -> IService:
    from cellvpn.client.service import VPNClientService

    config = load_or_exit(load_client_config, options)
    log_warnings(config.warnings)
    section = config.client
    overrides = dict(options.overrides)

    def load() -> ClientConfig:
        """The same file (by its absolute path) and overrides, for a reload."""
        return load_client_config(config.source, overrides)

    return ExitOnStartupError(
        VPNClientService(config),
        load=load,
        service_log=twistd_log(
            getattr(options, "parent", None), section.log_format, section.log_level
        ),
        level_of=lambda c: c.client.log_level,
    )
