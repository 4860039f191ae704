"""ConvertServer's per-connection path with fake sockets: what it asks the kernel.

No network: the client socket, the Connector and the relay are stand-ins, so
these tests see which socket options the converter reads per connection (the
real exchanges are in tests/integration/test_convert*.py).
"""

from __future__ import annotations

import ipaddress
import socket

import pytest

from mptcp_proxy.config import Endpoint
from mptcp_proxy.config_convert import ConvertConfig
from mptcp_proxy.dataplane.connect import ConnectResult
from mptcp_proxy.modes.convert import BARE_REPLY
from mptcp_proxy.modes.policy import parse_networks
from mptcp_proxy.observe.sockinfo import TCPI_OPT_SACK, TCPI_OPT_SYN_DATA
from mptcp_proxy.server import convert as server_mod
from mptcp_proxy.server.base import new_session
from mptcp_proxy.server.convert import ConvertServer
from mptcp_proxy.wire.convert import (
    ConnectTlv, ConvertMessage, ConvertSender, TcpOption, TcpOptionKind, decode_message,
)

TARGET = ipaddress.ip_address("10.9.0.2")
CLIENT_ADDR = ("10.1.0.2", 40000)


class FakeSock:
    """Answers recv() with a message and records every TCP_INFO read."""

    proto = 262

    def __init__(self, data: bytes = b"", options: int = 0) -> None:
        self.data = data
        self.options = options
        self.tcp_info_reads = 0

    def fileno(self) -> int:
        return 1000 + id(self) % 1000

    def recv(self, size: int) -> bytes:
        data, self.data = self.data, b""
        return data

    def getsockopt(self, level, name, size=None):
        if (level, name) == (socket.SOL_TCP, socket.TCP_INFO):
            self.tcp_info_reads += 1
            return bytes((1, 0, 0, 0, 0, self.options, 0x77, 0))[:size]
        if size is None:
            return 0
        raise OSError(95, "not supported here")

    def setsockopt(self, *args) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def server(monkeypatch):
    def negotiated_options(sock, mptcp):
        # Stands in for the real one (a TCP_INFO read through the fd, which a
        # fake cannot answer), counting the read.
        sock.tcp_info_reads += 1
        return (server_mod.Negotiated(mptcp=mptcp, sack=bool(sock.options & TCPI_OPT_SACK)),
                bool(sock.options & TCPI_OPT_SYN_DATA))

    monkeypatch.setattr(server_mod, "negotiated_options", negotiated_options)
    config = ConvertConfig(listen=Endpoint("127.0.0.1", 0),
                           allow_targets=parse_networks(["10.9.0.0/16"], "k"))
    srv = ConvertServer(config)
    srv.settings = srv._build_settings()
    srv.relayed = []
    srv.start_relay = lambda client, result, session, **kw: srv.relayed.append(kw)
    try:
        yield srv
    finally:
        srv.reactor.close()


def run(server: ConvertServer, message: bytes, *, early_sent: int = 0,
        upstream_options: int = 0) -> tuple[FakeSock, FakeSock]:
    client = FakeSock(message, options=TCPI_OPT_SYN_DATA)
    upstream = FakeSock(options=upstream_options)

    def connect(family, sockaddr, callback, source=None, early_data=b""):
        callback(ConnectResult(upstream, None, False, False, early_sent))

    server.connector.connect = connect
    server.handle_accept(client, CLIENT_ADDR, new_session(1, "client"))
    return client, upstream


def test_base_connect_reads_tcp_info_once_at_accept_and_not_after_connecting(server):
    client, upstream = run(server, ConvertMessage((ConnectTlv(80, TARGET),)).encode())
    assert (client.tcp_info_reads, upstream.tcp_info_reads) == (1, 0)
    assert server.relayed[-1]["reply"] == BARE_REPLY
    assert server.convert_stats.syn_data == 1
    assert not server.pending and not server.pending_by_client


def test_early_bytes_in_the_upstream_syn_are_checked(server):
    message = ConvertMessage((ConnectTlv(80, TARGET),)).encode() + b"GET /"
    _, upstream = run(server, message, early_sent=5, upstream_options=TCPI_OPT_SYN_DATA)
    assert upstream.tcp_info_reads == 1
    assert server.convert_stats.early_in_syn == 1


def test_extended_connect_reads_the_negotiated_options(server):
    option = TcpOption(TcpOptionKind.SACK_PERMITTED)
    _, upstream = run(server, ConvertMessage((ConnectTlv(80, TARGET, (option,)),)).encode(),
                      upstream_options=TCPI_OPT_SACK)
    assert upstream.tcp_info_reads == 1
    reply, _ = decode_message(server.relayed[-1]["reply"], ConvertSender.CONVERTER)
    assert reply.extended_tcp_header.options == (TcpOption(TcpOptionKind.SACK_PERMITTED),)


def test_pending_counts_per_client_return_to_zero(server, monkeypatch):
    monkeypatch.setattr(server_mod, "MEMO_SIZE", 1)
    for port in (80, 81, 82):
        run(server, ConvertMessage((ConnectTlv(port, TARGET),)).encode())
    assert not server.pending and not server.pending_by_client
    assert len(server._clients) <= 1 and len(server._targets) <= 1


def test_targets_are_remembered_per_address_and_port(server):
    seen = []

    def connect(family, sockaddr, callback, source=None, early_data=b""):
        seen.append((family, sockaddr))
        callback(ConnectResult(FakeSock(), None, False, False, 0))

    server.connector.connect = connect
    sessions = []
    for port in (80, 81, 80):
        session = new_session(len(sessions) + 1, "client")
        sessions.append(session)
        server.handle_accept(FakeSock(ConvertMessage((ConnectTlv(port, TARGET),)).encode(),
                                      options=TCPI_OPT_SYN_DATA), CLIENT_ADDR, session)
    assert seen == [(socket.AF_INET, ("10.9.0.2", 80)), (socket.AF_INET, ("10.9.0.2", 81)),
                    (socket.AF_INET, ("10.9.0.2", 80))]
    assert [s.target for s in sessions] == ["10.9.0.2:80", "10.9.0.2:81", "10.9.0.2:80"]
    assert len(server._targets) == 2


def test_a_remembered_id_of_another_address_is_not_used(server):
    # As if the id had been reused by another address object.
    other = ipaddress.ip_address("10.9.0.3")
    key = (id(other), 80)
    server._targets[key] = (TARGET, socket.AF_INET, ("10.9.0.2", 80), "10.9.0.2:80")
    message = ConvertMessage((ConnectTlv(80, other),)).encode()
    seen = []

    def connect(family, sockaddr, callback, source=None, early_data=b""):
        seen.append(sockaddr)
        callback(ConnectResult(FakeSock(), None, False, False, 0))

    server.connector.connect = connect
    # The codec hands out its own address object: make it ``other``.
    from mptcp_proxy.wire import convert as codec
    codec._ADDRESSES[bytes(10) + b"\xff\xff" + other.packed] = other
    codec._BASE_CONNECT_MESSAGES.pop(message, None)
    session = new_session(9, "client")
    server.handle_accept(FakeSock(message, options=TCPI_OPT_SYN_DATA), CLIENT_ADDR, session)
    assert seen == [("10.9.0.3", 80)] and session.target == "10.9.0.3:80"


@pytest.mark.parametrize("address, port, want", [
    ("192.0.2.7", 443, (socket.AF_INET, ("192.0.2.7", 443), "192.0.2.7:443")),
    ("2001:db8::7", 80, (socket.AF_INET6, ("2001:db8::7", 80, 0, 0), "[2001:db8::7]:80")),
])
def test_upstream_target(address, port, want):
    assert server_mod.upstream_target(ipaddress.ip_address(address), port) == want


def test_pending_sets_every_field_of_handshaking():
    """_Pending sets Handshaking's fields itself (one call less per connection):
    a field added to Handshaking must be set there too."""
    from mptcp_proxy.server.convert import _Pending
    from mptcp_proxy.server.handshake import Handshaking

    p = _Pending(FakeSock(), new_session(1, "c"), None, TARGET, "10.1.0.2", 0.0)
    for name in (*Handshaking.__slots__, *_Pending.__slots__):
        getattr(p, name)  # AttributeError for a field left unset
    plain = Handshaking(FakeSock(), new_session(2, "c"), "10.1.0.2", 0.0, p.state)
    for name in Handshaking.__slots__:
        if name not in ("sock", "fd", "session"):
            assert getattr(p, name) == getattr(plain, name), name


def test_a_repeated_base_connect_goes_the_quick_way(server, monkeypatch):
    made = []
    real = server_mod.ConvertHandshake
    monkeypatch.setattr(server_mod, "ConvertHandshake",
                        lambda *a: made.append(a) or real(*a))
    # A port no other test uses: the codec's memo of decoded messages is per process.
    message = ConvertMessage((ConnectTlv(4242, TARGET),)).encode()
    run(server, message + b"GET /")            # first: decoded by the handshake
    run(server, message + b"GET /")            # then: the codec and policy memos answer
    assert len(made) == 1
    assert [r["reply"] for r in server.relayed] == [BARE_REPLY, BARE_REPLY]
    assert [r["initial_to_upstream"] for r in server.relayed] == [b"GET /", b"GET /"]
    assert not server.pending and not server.pending_by_client


def test_a_quick_connection_whose_upstream_fails_gets_the_handshake_s_error(server):
    message = ConvertMessage((ConnectTlv(4243, TARGET),)).encode()
    run(server, message)                       # warms the memos
    closed = []
    server.close_with = lambda conn, reply, reason: closed.append((conn, reply, reason))

    def connect(family, sockaddr, callback, source=None, early_data=b""):
        (pending,) = server.pending.values()
        assert pending.handshake is None       # the quick way: no handshake object
        error = server_mod.UpstreamError(server_mod.REFUSED, "refused", errno=111)
        callback(ConnectResult(None, error, False, False))

    server.connector.connect = connect
    session = new_session(2, "client")
    server.handle_accept(FakeSock(message, options=TCPI_OPT_SYN_DATA), CLIENT_ADDR, session)
    (conn, reply, reason), = closed
    assert conn.handshake is not None         # rebuilt to word the error
    decoded, _ = decode_message(reply, ConvertSender.CONVERTER)
    assert decoded.tlvs[0].code == 96          # Connection Reset (refused), RFC 8803 §4.2.8
    assert (reason, session.extra["convert"]) == ("upstream-refused", "error:96")
