"""Shared pieces of the converter tests: Convert requests sent with TFO, reply
parsing, a well-behaved parallel client, and the ``env`` fixture (import it into
a test module to use it); the lab and what the app-proxy tests share too are in
``lab_env.py``.

client ns (MPTCP + TFO raw client) -> converter in the proxy ns -> servers in the
server ns.
"""

from __future__ import annotations

import ipaddress
import socket
import threading

import pytest

from mptcp_proxy.config_convert import ConvertConfig
from mptcp_proxy.server.convert import ConvertServer
from mptcp_proxy.wire.convert import (
    ConnectTlv,
    ConvertDecoder,
    ConvertErrorCode,
    ConvertMessage,
    ConvertSender,
    CookieTlv,
    InfoTlv,
    TcpOption,
    TcpOptionKind,
)
from tests.support.lab_env import (
    MPTCP_SERVER_PORT, SERVER_PORT, GoodClientBase, LabEnv, lab_env, relay_rest,
)
from tests.support.servers import ProxyRunner
from tests.support.traffic import payload, sha256

TCP_FASTOPEN = 23
TCP_FASTOPEN_NO_COOKIE = 34
DOWN = payload(300_000, 77)       # what every server sends on each connection
E = ConvertErrorCode
MPTCP_OPTION = TcpOption(TcpOptionKind.MPTCP, bytes((0x01, 0x01)))


# --------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------

def request(address: str, port: int, *, options=(), info: bool = False,
            cookie: bytes | None = None) -> bytes:
    tlvs: list = [InfoTlv()] if info else []
    tlvs.append(ConnectTlv(port, ipaddress.ip_address(address), tuple(options)))
    if cookie is not None:
        tlvs.append(CookieTlv(cookie))
    return ConvertMessage(tuple(tlvs)).encode()


def tfo_send(sock: socket.socket, data: bytes, addr: tuple) -> int:
    """Connect with ``data`` in the SYN; returns the bytes the SYN took (0: no cookie).

    A socket with a timeout is non-blocking inside: without a TFO cookie the
    kernel sends a SYN asking for one and says EINPROGRESS; the data follows
    the handshake.
    """
    try:
        sent = sock.sendto(data, socket.MSG_FASTOPEN, addr)
    except BlockingIOError:
        sent = 0
    sock.sendall(data[sent:])
    return sent


def read_reply(sock: socket.socket) -> tuple[ConvertMessage, bytes]:
    """The converter's Convert message and the server bytes that followed it."""
    decoder = ConvertDecoder(ConvertSender.CONVERTER)
    while True:
        data = sock.recv(4096)
        if not data:
            decoder.feed_eof()
        message = decoder.feed(data)
        if message is not None:
            return message, decoder.leftover


def expect_error(sock: socket.socket, code: ConvertErrorCode):
    """Read an Error reply, then a clean EOF (FIN, not RST): return the Error TLV."""
    message, rest = read_reply(sock)
    error = message.error
    assert error is not None, message
    assert error.code == code, (error, code)
    assert rest == b""
    assert sock.recv(100) == b"", "converter sent bytes after the Error"
    return error


class ConvertEnv(LabEnv):
    """A lab with a TCP and an MPTCP hash server, and converters started per test."""

    def config(self, **kw) -> ConvertConfig:
        return ConvertConfig(**self.defaults(kw))

    def start(self, **kw) -> ProxyRunner:
        return self.run(lambda: ConvertServer(self.config(**kw)).start())

    def client(self, *, mptcp: bool = True, no_cookie: bool = True, v6: bool = False,
               timeout: float = 10.0) -> socket.socket:
        sock = super().client(mptcp, timeout, v6=v6)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if no_cookie:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
        return sock

    def passive_tfo(self, node: str = "proxy") -> int:
        return self.lab.node(node).netstat()["TcpExt"]["TCPFastOpenPassive"]


@pytest.fixture(scope="module")
def env():
    with lab_env(ConvertEnv, DOWN) as e:
        yield e


def transfer(env: ConvertEnv, addr: tuple, up: bytes, *, tfo: bool = True,
             no_cookie: bool = True, options=(), info: bool = False,
             cookie: bytes | None = None, replied: threading.Event | None = None,
             hold: threading.Event | None = None, server: str = "tcp",
             mptcp: bool = True, v6: bool = False) -> tuple[ConvertMessage, bytes]:
    """One converted connection: request (+ the first app bytes) in the SYN, the rest
    after; returns the reply and every server byte received. ``replied`` is set
    once the reply arrived; then the upload waits for ``hold``."""
    target = (env.lab.server_addr6 if v6 else env.server_addr)
    port = SERVER_PORT if server == "tcp" else MPTCP_SERVER_PORT
    first, rest = up[:1000], up[1000:]
    sock = env.client(mptcp=mptcp, no_cookie=no_cookie, v6=v6)
    with sock:
        head = request(target, port, options=options, info=info, cookie=cookie) + first
        if tfo:
            tfo_send(sock, head, addr)
        else:
            sock.connect(addr)
            sock.sendall(head)
        reply, leftover = read_reply(sock)
        down = relay_rest(sock, rest, leftover, replied=replied, hold=hold)
    return reply, down


class GoodClient(GoodClientBase):
    """A converted connection (``transfer``) kept relaying while a bad client is
    served (see ``GoodClientBase``)."""

    def __init__(self, env: ConvertEnv, addr: tuple, seed: int = 5) -> None:
        super().__init__(env, payload(400_000, seed), addr)

    def transfer(self, addr: tuple) -> tuple[ConvertMessage, bytes]:
        return transfer(self.env, addr, self.up, replied=self.replied, hold=self.hold)

    def check(self) -> None:
        """Let it finish and verify both directions byte for byte."""
        result = self.finish()
        assert result is not None, "good client did not finish"
        reply, down = result
        assert reply.error is None and reply.tlvs == ()
        assert sha256(down) == sha256(DOWN) and len(down) == len(DOWN)
        self.wait_uploaded()
