"""Shared pieces of the converter tests: a lab with servers, Convert requests sent
with TFO, reply parsing, a well-behaved parallel client, and the ``env`` and
``conn_log`` fixtures (import them into a test module to use them).

client ns (MPTCP + TFO raw client) -> converter in the proxy ns -> servers in the
server ns.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest

from mptcp_proxy.config import Endpoint, RelayConfig
from mptcp_proxy.config_convert import ConvertConfig
from mptcp_proxy.lab import Lab, PathSpec
from mptcp_proxy.modes.policy import parse_networks
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
from tests.support.servers import HashServer, ProxyRunner
from tests.support.traffic import payload, sha256

IPPROTO_MPTCP = 262
TCP_FASTOPEN = 23
TCP_FASTOPEN_NO_COOKIE = 34
SERVER_PORT = 9000
MPTCP_SERVER_PORT = 9001
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


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def expect_error(sock: socket.socket, code: ConvertErrorCode):
    """Read an Error reply, then a clean EOF (FIN, not RST): return the Error TLV."""
    message, rest = read_reply(sock)
    error = message.error
    assert error is not None, message
    assert error.code == code, (error, code)
    assert rest == b""
    assert sock.recv(100) == b"", "converter sent bytes after the Error"
    return error


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.01)


@dataclass
class ConvertEnv:
    """A lab with a TCP and an MPTCP hash server, and converters started per test."""

    lab: Lab
    tcp_server: HashServer
    mptcp_server: HashServer
    runners: list[ProxyRunner] = field(default_factory=list)

    @property
    def server_addr(self) -> str:
        return self.lab.server_addr

    @property
    def proxy_addr(self) -> str:
        return self.lab.paths[0].proxy_addr

    def config(self, **kw) -> ConvertConfig:
        k = self.lab.server_addr.split(".")[1]
        kw.setdefault("listen", Endpoint(self.proxy_addr, 0))
        kw.setdefault("allow_targets", parse_networks([f"10.{k}.0.0/16", "fd00::/8"], "t"))
        kw.setdefault("relay", RelayConfig(connect_timeout=3))
        return ConvertConfig(**kw)

    def start(self, **kw) -> ProxyRunner:
        with self.lab.proxy.enter():
            server = ConvertServer(self.config(**kw)).start()
        runner = ProxyRunner(server, netns=self.lab.proxy.ns).start()
        self.runners.append(runner)
        return runner

    def client(self, *, mptcp: bool = True, no_cookie: bool = True, v6: bool = False,
               timeout: float = 10.0) -> socket.socket:
        family = socket.AF_INET6 if v6 else socket.AF_INET
        with self.lab.client.enter():
            sock = socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP if mptcp else 0)
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if no_cookie:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
        return sock

    def passive_tfo(self, node: str = "proxy") -> int:
        return self.lab.node(node).netstat()["TcpExt"]["TCPFastOpenPassive"]

    def stop(self) -> None:
        for runner in self.runners:
            runner.stop()
        self.runners.clear()


@pytest.fixture(scope="module")
def env():
    with Lab.create(paths=[PathSpec()]) as lab:
        with lab.server.enter():
            tcp = HashServer(lab.server_addr, mptcp=False, port=SERVER_PORT,
                             reply_fn=lambda i: DOWN)
            mp = HashServer(lab.server_addr, mptcp=True, port=MPTCP_SERVER_PORT,
                            reply_fn=lambda i: DOWN)
        e = ConvertEnv(lab, tcp, mp)
        try:
            yield e
        finally:
            e.stop()
            tcp.close()
            mp.close()


@pytest.fixture
def conn_log(caplog):
    caplog.set_level(logging.INFO, logger="mptcp_proxy.conn")
    return caplog


def log_lines(caplog, *needles: str, timeout: float = 5.0) -> list[str]:
    """The connection log lines containing every needle (waits for the server thread)."""
    def find():
        return [r.getMessage() for r in list(caplog.records)
                if r.name == "mptcp_proxy.conn" and all(n in r.getMessage() for n in needles)]
    return wait_for(find, timeout, f"log line with {needles}")


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
        if replied is not None:
            replied.set()
        if hold is not None:
            assert hold.wait(20), "the bad client never finished"
        sender = threading.Thread(target=lambda: (sock.sendall(rest),
                                                  sock.shutdown(socket.SHUT_WR)))
        sender.start()
        down = leftover + recv_all(sock)
        sender.join(20)
    return reply, down


class GoodClient:
    """A well-behaved client whose connection is open and relaying while a bad one
    is served: started first, it finishes its upload only after ``check()``."""

    def __init__(self, env: ConvertEnv, addr: tuple, seed: int = 5) -> None:
        self.env = env
        self.up = payload(400_000, seed)
        self.replied = threading.Event()
        self.hold = threading.Event()
        self.result: tuple | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(addr,), daemon=True)
        self.thread.start()
        if not self.replied.wait(10):
            self.hold.set()
            raise AssertionError(f"good client got no reply: {self.error!r}")

    def _run(self, addr: tuple) -> None:
        try:
            self.result = transfer(self.env, addr, self.up, replied=self.replied,
                                   hold=self.hold)
        except BaseException as exc:  # re-raised in check()
            self.error = exc
            self.replied.set()

    def check(self) -> None:
        """Let it finish and verify both directions byte for byte."""
        self.hold.set()
        self.thread.join(30)
        if self.error is not None:
            raise self.error
        assert self.result is not None, "good client did not finish"
        reply, down = self.result
        assert reply.error is None and reply.tlvs == ()
        assert sha256(down) == sha256(DOWN) and len(down) == len(DOWN)
        want = (sha256(self.up), len(self.up))
        wait_for(lambda: want in self.env.tcp_server.received, 10, "server got good bytes")
