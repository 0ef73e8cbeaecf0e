"""``[client] socks``: a local SOCKS5 listener whose connections the server's L4 proxy makes.

Each SOCKS CONNECT becomes a CONNECT on 'S' under a fresh ``sock_id``; the server's CONNECTED
or PROBLEM decides the SOCKS reply, and then bytes go as SEND and come back as RECV until
either side sends DISCONNECT. Nothing here needs root or a TUN, so a client with
``vpn = false`` can be a plain SOCKS proxy through the server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from cellvpn.client.machine import ClientState
from cellvpn.client.socks5 import ConnectRequest, Reply, Socks5Error, Socks5Handshake, reply
from cellvpn.client.stream import ClientStream
from cellvpn.conn.flow import StreamFlow, chunk_size
from cellvpn.conn.listen import listen_now
from cellvpn.wire.vpn import OpCode, ProblemCode, VpnPacket

if TYPE_CHECKING:
    from cellvpn.client.service import VPNClientService

#: Bytes a SOCKS client may send before the server has answered its CONNECT.
EARLY_DATA_LIMIT = 256 * 1024
_LARGEST_SOCK_ID = 2**31 - 1

#: The SOCKS reply for a PROBLEM code about one socket.
_PROBLEM_REPLY: dict[int, Reply] = {
    ProblemCode.PROXY_DENIED: Reply.NOT_ALLOWED,
    ProblemCode.PROXY_FAILED: Reply.CONNECTION_REFUSED,
}


class SocksConnection(Protocol):
    """One SOCKS client: the handshake, then its bytes relayed under one ``sock_id``."""

    def __init__(self, service: SocksService) -> None:
        self.service = service
        self.handshake = Socks5Handshake()
        self.sock_id = 0
        self.stream: ClientStream | None = None
        self.flow: StreamFlow | None = None
        self.relaying = False
        self.early: list[bytes] = []
        self.early_size = 0
        self.closed = False

    def connectionMade(self) -> None:
        self.service.live.add(self)

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        if self.relaying:
            self.service.send_data(self, data)
        elif self.sock_id:
            self._hold(data)
        else:
            self._handshake(data)

    def _handshake(self, data: bytes) -> None:
        try:
            request = self.handshake.feed(data)
        except Socks5Error:
            self.close()
            return
        self._write(self.handshake.data_to_send())
        if self.handshake.refused:
            self.close()
        elif request is not None:
            self.service.open(self, request)
            if self.handshake.rest and not self.closed:
                self._hold(self.handshake.rest)

    def _hold(self, data: bytes) -> None:
        """Bytes sent before the server answered: kept (within a limit) until it does."""
        self.early.append(data)
        self.early_size += len(data)
        if self.early_size > EARLY_DATA_LIMIT:
            self.service.forget(self, tell_server=True)
            self.close()

    def _write(self, data: bytes) -> None:
        if data and self.transport is not None:
            self.transport.write(data)

    def answer(self, code: int) -> None:
        """The SOCKS reply; on success the relay starts with what the client sent early."""
        self._write(reply(code))
        if code != Reply.SUCCEEDED:
            self.close()
            return
        self.relaying = True
        early, self.early, self.early_size = self.early, [], 0
        for data in early:
            self.service.send_data(self, data)

    def close(self) -> None:
        """Close after what is written has gone out."""
        if self.closed:
            return
        self.closed = True
        if self.transport is not None:
            if self.flow is not None:
                self.flow.detach(self.transport)
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.flow is not None and self.transport is not None:
            self.flow.detach(self.transport)
        self.closed = True
        self.service.live.discard(self)
        self.service.forget(self, tell_server=True)


class _SocksFactory(Factory):
    noisy = False

    def __init__(self, service: SocksService) -> None:
        self.service = service

    def buildProtocol(self, addr: Any) -> Protocol:
        return SocksConnection(self.service)


class SocksService(Service):
    """Listens on ``[client] socks`` and relays each SOCKS connection through the client."""

    log = Logger()

    def __init__(self, endpoint: str, client: VPNClientService, reactor: Any) -> None:
        self.endpoint = endpoint
        self.client = client
        self.reactor = reactor
        self.port: Any = None
        #: Connections with a sock_id, waiting for the server or relaying.
        self.connections: dict[int, SocksConnection] = {}
        #: Every open SOCKS connection, also those still in the handshake.
        self.live: set[SocksConnection] = set()
        self._next_id = 1
        self._flow: StreamFlow | None = None

    def privilegedStartService(self) -> None:
        endpoint = serverFromString(self.reactor, self.endpoint)
        self.port = listen_now(endpoint, _SocksFactory(self), self.endpoint)
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        host = self.port.getHost() if self.port is not None else None
        self.log.info(
            "SOCKS5 proxy listening on {host}:{port}",
            host=getattr(host, "host", self.endpoint),
            port=getattr(host, "port", "?"),
        )

    def stopService(self) -> Any:
        super().stopService()
        self.link_lost()
        for conn in list(self.live):
            conn.close()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None

    # --- from SOCKS connections ------------------------------------------------------------

    def open(self, conn: SocksConnection, request: ConnectRequest) -> None:
        """Ask the server for ``request``: CONNECT under a new sock_id."""
        client = self.client
        stream = client.stream
        if client.state is not ClientState.STARTED or stream is None or stream.proto is None:
            conn.answer(Reply.NETWORK_UNREACHABLE)
            return
        conn.sock_id = self._new_sock_id()
        conn.stream = stream
        self.connections[conn.sock_id] = conn
        conn.flow = self._flow_for(stream)
        if conn.transport is not None:
            conn.flow.attach(conn.transport)
        host = request.host.encode("ascii")
        packet = VpnPacket(OpCode.CONNECT, host, conn.sock_id, stream.usage_id, port=request.port)
        stream.send_vpn(packet)

    def send_data(self, conn: SocksConnection, data: bytes) -> None:
        stream = conn.stream
        if stream is None or stream.proto is None or self.connections.get(conn.sock_id) is not conn:
            return
        welcome = stream.proto.conn.welcome
        size = chunk_size(welcome.max_frame if welcome is not None else 0)
        view = memoryview(data)
        for offset in range(0, len(data), size):
            chunk = bytes(view[offset : offset + size])
            stream.send_vpn(VpnPacket(OpCode.SEND, chunk, conn.sock_id, stream.usage_id), False)
        stream.flush()

    def forget(self, conn: SocksConnection, tell_server: bool) -> None:
        """``conn`` is done: drop its sock_id, and tell the server unless it told us."""
        if not conn.sock_id or self.connections.get(conn.sock_id) is not conn:
            return
        del self.connections[conn.sock_id]
        stream = conn.stream
        if tell_server and stream is not None and stream is self.client.stream:
            _disconnect(stream, conn.sock_id)

    def _new_sock_id(self) -> int:
        while True:
            sock_id = self._next_id
            self._next_id = sock_id + 1 if sock_id < _LARGEST_SOCK_ID else 1
            if sock_id not in self.connections:
                return sock_id

    def _flow_for(self, stream: ClientStream) -> StreamFlow:
        assert stream.proto is not None
        flow = self._flow
        if flow is None or flow.proto is not stream.proto:
            if flow is not None:
                flow.close()
            flow = self._flow = StreamFlow(stream.proto)
        return flow

    # --- from the server (through VPNClientService.proxy_packet) ---------------------------

    def packet(self, packet: VpnPacket) -> None:
        conn = self.connections.get(packet.sock_id)
        op = packet.op_code
        if conn is None:
            if op == OpCode.RECV or op == OpCode.CONNECTED:
                # the server holds a socket this side has closed: tell it again
                stream = self.client.stream
                if stream is not None:
                    _disconnect(stream, packet.sock_id)
            return
        if op == OpCode.RECV:
            if conn.relaying and conn.transport is not None:
                conn.transport.write(packet.data)
        elif op == OpCode.CONNECTED:
            if not conn.relaying:
                conn.answer(Reply.SUCCEEDED)
        elif op == OpCode.PROBLEM:
            self.forget(conn, tell_server=False)
            if conn.relaying:
                conn.close()
            else:
                conn.answer(_PROBLEM_REPLY.get(packet.code, Reply.GENERAL_FAILURE))
        elif op == OpCode.DISCONNECT:
            self.forget(conn, tell_server=False)
            if conn.relaying:
                conn.close()
            else:
                conn.answer(Reply.GENERAL_FAILURE)

    def link_lost(self) -> None:
        """The stream is gone: every SOCKS connection ends (those still waiting hear 0x03)."""
        connections, self.connections = self.connections, {}
        for conn in connections.values():
            if conn.relaying:
                conn.close()
            else:
                conn.answer(Reply.NETWORK_UNREACHABLE)
        if self._flow is not None:
            self._flow.close()
            self._flow = None


def _disconnect(stream: ClientStream, sock_id: int) -> None:
    stream.send_vpn(VpnPacket(OpCode.DISCONNECT, b"", sock_id, stream.usage_id))
