"""The control socket: AMP over a UNIX socket, spoken by ``cellvpn-ctl``."""
