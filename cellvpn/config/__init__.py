"""cellvpn's configuration: INI files and command-line overrides, validated into frozen dataclasses.

Plain Python with no reactor, so tools and tests can load and check a config without starting
anything. :func:`load_server_config` and :func:`load_client_config` are the entry points.
"""

from cellvpn.config.errors import ConfigError
from cellvpn.config.example import KeyInfo, describe_keys, render_example
from cellvpn.config.loader import load_client_config, load_server_config
from cellvpn.config.parsers import HostPort
from cellvpn.config.schema import (
    ClientConfig,
    ClientControlSection,
    ClientSection,
    ControlSection,
    MetricsSection,
    Offload,
    ServerConfig,
    ServerSection,
    SrvVpnSection,
    TLSServerSection,
    WalletSection,
)

__all__ = [
    "ClientConfig",
    "ClientControlSection",
    "ClientSection",
    "ConfigError",
    "ControlSection",
    "HostPort",
    "KeyInfo",
    "MetricsSection",
    "Offload",
    "ServerConfig",
    "ServerSection",
    "SrvVpnSection",
    "TLSServerSection",
    "WalletSection",
    "describe_keys",
    "load_client_config",
    "load_server_config",
    "render_example",
]
