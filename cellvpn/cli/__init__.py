"""``cellvpn-ctl``: the command-line tool.

:mod:`cellvpn.cli.main` is the entry point, :mod:`cellvpn.cli.control` the control-socket
client, :mod:`cellvpn.cli.ledger` the ledger commands (and :mod:`cellvpn.cli.viasocket`,
:mod:`cellvpn.cli.ownreceipts` their socket and client-record variants). Nothing outside this
package imports it at module level: the services load the ledger commands only when a caller
asks for one over the control socket.
"""
