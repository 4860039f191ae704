"""`convert` mode in a namespace lab: real TFO, real MPTCP, hash-verified relays.

client ns (MPTCP + TFO raw client) -> converter in the proxy ns -> servers in the
server ns. The Convert header rides the SYN (sendto MSG_FASTOPEN); the kernel's
evidence is read, not assumed: TCPI_OPT_SYN_DATA on the accepted socket
(``tfo=yes`` in the log line) and TcpExt:TCPFastOpenPassive in the converter's
namespace; TCPFastOpenPassive in the server's namespace for the upstream SYN.

The helpers here are shared with ``test_convert_badinput.py``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest

from mptcp_proxy.config import Endpoint, RelayConfig
from mptcp_proxy.config_convert import ConvertConfig
from mptcp_proxy.lab import Lab, PathSpec
from mptcp_proxy.modes.convert import CookieAuthority
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

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

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


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------

def test_header_in_the_syn_relays_hash_verified_both_ways(env, conn_log):
    runner = env.start(tfo_no_cookie=True)
    before = env.passive_tfo()
    up = payload(2_000_000, 11)
    reply, down = transfer(env, runner.addr, up)
    assert reply == ConvertMessage(())        # base Connect: the bare header
    assert down == DOWN
    wait_for(lambda: (sha256(up), len(up)) in env.tcp_server.received, what="upload")
    closed = runner.wait_closed(1)[0]
    assert closed.reason == "done"
    assert closed.session.extra["tfo"] == "yes"          # TCPI_OPT_SYN_DATA (accepted socket)
    assert closed.session.extra["convert"] == "connect"
    assert closed.session.client_mptcp is True
    assert (closed.up, closed.down) == (len(up), len(DOWN) + 4)
    assert env.passive_tfo() >= before + 1               # the namespace's kernel counter
    assert runner.server.convert_stats.syn_data == 1
    line = log_lines(conn_log, "mode=convert", "reason=done")[0]
    assert "tfo=yes" in line and "convert=connect" in line and "client_side=mptcp" in line
    assert f"target={env.server_addr}:{SERVER_PORT}" in line


def test_default_cookie_mode_first_connection_after_handshake_then_0rtt(env):
    """Without --tfo-no-cookie the first connection fetches a TFO cookie (header
    after the handshake, still served); the next one carries the header in its SYN."""
    runner = env.start()
    before = env.passive_tfo()
    for i in range(2):
        up = payload(50_000, 20 + i)
        reply, down = transfer(env, runner.addr, up, no_cookie=False)
        assert reply.error is None and down == DOWN
    sessions = sorted(runner.wait_closed(2), key=lambda c: c.session.id)
    assert [c.session.extra["tfo"] for c in sessions] == ["no", "yes"]
    assert env.passive_tfo() == before + 1
    assert runner.server.convert_stats.syn_data == 1
    assert runner.server.convert_stats.no_syn_data == 1


@pytest.mark.parametrize("server, mptcp_capable", [("mptcp", True), ("tcp", False)])
def test_extended_connect_returns_the_servers_options(env, server, mptcp_capable):
    runner = env.start(tfo_no_cookie=True)
    options = (MPTCP_OPTION, TcpOption(TcpOptionKind.SACK_PERMITTED))
    up = payload(30_000, 3)
    reply, down = transfer(env, runner.addr, up, options=options, server=server)
    assert down == DOWN
    header = reply.extended_tcp_header
    assert header is not None, reply
    assert header.mptcp_capable is mptcp_capable
    kinds = [o.kind for o in header.options]
    assert TcpOptionKind.SACK_PERMITTED in kinds and TcpOptionKind.TIMESTAMPS in kinds
    session = runner.wait_closed(1)[0].session
    assert session.upstream_mptcp is mptcp_capable


def test_info_lists_mptcp_and_closes(env):
    runner = env.start(tfo_no_cookie=True)
    sock = env.client()
    with sock:
        tfo_send(sock, ConvertMessage((InfoTlv(),)).encode(), runner.addr)
        reply, rest = read_reply(sock)
        assert rest == b"" and sock.recv(10) == b""
    kinds = reply.supported_tcp_ext.kinds
    assert TcpOptionKind.MPTCP in kinds and TcpOptionKind.SACK_PERMITTED in kinds
    closed = runner.wait_closed(1)[0]
    assert closed.reason == "info" and closed.session.extra["convert"] == "info"


def test_info_and_connect_in_one_message(env):
    runner = env.start(tfo_no_cookie=True)
    reply, down = transfer(env, runner.addr, payload(5000, 4), info=True)
    assert TcpOptionKind.MPTCP in reply.supported_tcp_ext.kinds
    assert reply.extended_tcp_header is None and down == DOWN
    assert runner.wait_closed(1)[0].session.extra["convert"] == "connect+info"


def test_upstream_tfo_carries_the_first_bytes_in_the_servers_syn(env):
    """A TFO server: after the converter holds its cookie, the client's first bytes
    ride the converter's SYN to the server (TCPFastOpenPassive in the server ns)."""
    env.lab.server.sysctl("net.ipv4.tcp_fastopen", 3)
    with env.lab.server.enter():
        tfo_server = HashServer(env.server_addr, mptcp=True, port=9100,
                                reply_fn=lambda i: DOWN)
    tfo_server.sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, 16)
    try:
        runner = env.start(tfo_no_cookie=True)
        before = env.passive_tfo("server")
        ups = [payload(20_000, 30 + i) for i in range(2)]
        for up in ups:
            sock = env.client()
            with sock:
                tfo_send(sock, request(env.server_addr, 9100) + up, runner.addr)
                reply, leftover = read_reply(sock)
                sock.shutdown(socket.SHUT_WR)
                assert leftover + recv_all(sock) == DOWN
        assert tfo_server.wait_received(2) == [(sha256(u), len(u)) for u in ups]
        sessions = sorted(runner.wait_closed(2), key=lambda c: c.session.id)
        assert [c.session.extra["upstream_tfo"] for c in sessions] == ["no", "yes"]
        assert env.passive_tfo("server") == before + 1
        assert runner.server.convert_stats.early_in_syn == 1
    finally:
        tfo_server.close()


def test_ipv6_client_and_target(env):
    with env.lab.server.enter():
        v6_server = HashServer(env.lab.server_addr6, mptcp=True, port=SERVER_PORT,
                               reply_fn=lambda i: DOWN)
    try:
        runner = env.start(tfo_no_cookie=True,
                           listen=Endpoint(env.lab.paths[0].proxy_addr6, 0))
        up = payload(100_000, 6)
        reply, down = transfer(env, runner.addr[:2], up, v6=True)
        assert reply.error is None and down == DOWN
        assert v6_server.wait_received(1) == [(sha256(up), len(up))]
        closed = runner.wait_closed(1)[0]
        assert closed.session.target == f"[{env.lab.server_addr6}]:{SERVER_PORT}"
        assert closed.session.extra["tfo"] == "yes"
        assert closed.session.upstream_mptcp is True
    finally:
        v6_server.close()


def test_plain_tcp_client_without_tfo(env):
    runner = env.start()
    up = payload(100_000, 7)
    reply, down = transfer(env, runner.addr, up, tfo=False, mptcp=False, no_cookie=False)
    assert reply.error is None and down == DOWN
    closed = runner.wait_closed(1)[0]
    assert closed.session.client_mptcp is False and closed.session.extra["tfo"] == "no"


def test_cookie_round_trip(env, tmp_path):
    secret = b"lab-secret-0123456789abcdef"
    runner = env.start(tfo_no_cookie=True, cookie_secret=secret)
    sock = env.client()
    with sock:
        tfo_send(sock, request(env.server_addr, SERVER_PORT), runner.addr)
        cookie = expect_error(sock, E.MISSING_COOKIE).cookie
    assert CookieAuthority(secret).valid(ipaddress.ip_address(env.lab.paths[0].client_addr),
                                         cookie, time.time())
    reply, down = transfer(env, runner.addr, payload(10_000, 8), cookie=cookie)
    assert reply.error is None and down == DOWN


def test_unreachable_destination_is_error_97(env):
    k = env.server_addr.split(".")[1]
    env.lab.proxy.run(["ip", "route", "add", "unreachable", f"10.{k}.99.0/24"])
    try:
        runner = env.start(tfo_no_cookie=True)
        sock = env.client()
        with sock:
            tfo_send(sock, request(f"10.{k}.99.9", 80), runner.addr)
            error = expect_error(sock, E.DESTINATION_UNREACHABLE)
        assert error.icmp_code in (0, 1)
        assert runner.wait_closed(1)[0].reason == "upstream-unreachable"
    finally:
        env.lab.proxy.run(["ip", "route", "del", "unreachable", f"10.{k}.99.0/24"])


def test_sysctls_are_set_while_running_and_restored(env):
    key = "net.ipv4.tcp_fastopen"
    before = env.lab.proxy.sysctl(key)
    runner = env.start()
    assert int(env.lab.proxy.sysctl(key)) & 0x3 == 0x3
    runner.stop()
    env.runners.remove(runner)
    assert env.lab.proxy.sysctl(key) == before


def test_tfo_no_cookie_uses_the_listener_option_not_the_sysctl(env):
    env.start(tfo_no_cookie=True)
    assert int(env.lab.proxy.sysctl("net.ipv4.tcp_fastopen")) & 0x200 == 0
