"""SOCKS5 and HTTP CONNECT proxies (``socks5``/``http-connect`` modes) in a lab.

client ns (MPTCP sockets, two paths) -> proxy in the proxy ns -> TCP and MPTCP
hash servers in the server ns. Transfers are hash-verified both ways; the
multipath test reads the proxy's subflow counts and the per-path counters.
The bad-input matrix (TESTING.md, SOCKS5 and HTTP CONNECT rows) runs each case
while a good client is mid-transfer, and checks the protocol's answer, the
clean close (FIN, never RST), the log line, and the good client's bytes.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
import threading
import time

import pytest

from mptcp_proxy.config import RelayConfig
from mptcp_proxy.config_app_proxy import AppProxyConfig, Credentials
from mptcp_proxy.lab import Lab
from mptcp_proxy.modes.app_proxy import HTTP_CONNECT, SOCKS5
from mptcp_proxy.modes.policy import parse_networks
from mptcp_proxy.modes.transparent import PortSet
from mptcp_proxy.server.app_proxy import AppProxyServer
from tests.support.lab_env import (  # noqa: F401  (conn_log is a fixture)
    MPTCP_SERVER_PORT, SERVER_PORT, GoodClientBase, LabEnv, conn_log, lab_env, log_lines,
    read_exact, recv_all, relay_rest, wait_for,
)
from tests.support.servers import HashServer, ProxyRunner, silent_upstream
from tests.support.traffic import payload, sha256

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

DOWN = payload(300_000, 41)
DEADLINE = 1.5


class FakeResolver:
    """The lab's names; anything else fails like getaddrinfo does."""

    def __init__(self, names: dict[str, str | list[str]]) -> None:
        self.names = names

    def __call__(self, host: str, port: int) -> list[str]:
        if host.startswith("slow"):
            time.sleep(3)   # a DNS server that does not answer in time
        try:
            found = self.names[host]
            return list(found) if isinstance(found, list) else [found]
        except KeyError:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None


class AppEnv(LabEnv):
    def __init__(self, lab: Lab, tcp: HashServer, mp: HashServer) -> None:
        super().__init__(lab, tcp, mp)
        self.resolver = FakeResolver({
            "server.lab.example": lab.server_addr,
            "loop.lab.example": "127.0.0.1",
            # The servers listen on IPv4 only: the IPv6 address refuses.
            "multi.lab.example": [lab.server_addr6, lab.server_addr],
            "mixed.lab.example": ["127.0.0.1", lab.server_addr],
        })

    def start(self, protocol: str, **kw) -> ProxyRunner:
        self.defaults(kw)
        kw.setdefault("handshake_timeout", DEADLINE)
        config = AppProxyConfig(protocol=protocol, **kw)
        return self.run(lambda: AppProxyServer(config, resolver=self.resolver).start())


@pytest.fixture(scope="module")
def env():
    with lab_env(AppEnv, DOWN, paths=2) as e:
        yield e


@pytest.fixture(params=[SOCKS5, HTTP_CONNECT])
def proto(request):
    return request.param


@pytest.fixture
def proxies(env):
    """One proxy of each protocol for this test."""
    started = {p: env.start(p) for p in (SOCKS5, HTTP_CONNECT)}
    yield started
    for r in started.values():
        r.stop()
        env.runners.remove(r)


# --------------------------------------------------------------------------
# Client sides of the handshakes
# --------------------------------------------------------------------------

def socks_request(host: str, port: int, auth: tuple[str, str] | None = None) -> bytes:
    """Greeting (+ auth) + CONNECT, as one pipelined blob."""
    if auth is None:
        out = bytes.fromhex("050100")
    else:
        user, pw = (x.encode() for x in auth)
        out = bytes.fromhex("050102") + bytes([1, len(user)]) + user + bytes([len(pw)]) + pw
    try:
        ip = ipaddress.ip_address(host)
        atyp = 1 if ip.version == 4 else 4
        addr = bytes([atyp]) + ip.packed
    except ValueError:
        addr = bytes([3, len(host)]) + host.encode()
    return out + bytes([5, 1, 0]) + addr + struct.pack("!H", port)


def socks_reply(sock: socket.socket, auth: bool = False) -> tuple[int, bytes]:
    """(REP, BND.ADDR) after the method (and auth) replies."""
    assert read_exact(sock, 2) == (b"\x05\x02" if auth else b"\x05\x00")
    if auth:
        assert read_exact(sock, 2) == b"\x01\x00"
    head = read_exact(sock, 4)
    assert head[0] == 5 and head[2] == 0, head
    size = {1: 4, 4: 16}[head[3]]
    return head[1], read_exact(sock, size + 2)


def http_request(host: str, port: int, extra: str = "") -> bytes:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{extra}\r\n".encode()


def http_reply(sock: socket.socket) -> tuple[int, bytes]:
    """(status, the whole response head)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return int(data.split(b" ", 2)[1]), data


def tunnel(env: AppEnv, addr: tuple, protocol: str, host: str, port: int, up: bytes, *,
           pipelined: bytes = b"", auth: tuple[str, str] | None = None,
           replied: threading.Event | None = None, hold: threading.Event | None = None,
           mptcp: bool = True) -> bytes:
    """One proxied connection: handshake (plus ``pipelined`` bytes sent before the
    answer), then ``up`` both ways; returns every byte the server sent."""
    sock = env.client(mptcp=mptcp)
    with sock:
        sock.connect(addr)
        if protocol == SOCKS5:
            sock.sendall(socks_request(host, port, auth) + pipelined)
            rep, _ = socks_reply(sock, auth is not None)
            assert rep == 0, f"SOCKS5 reply {rep}"
        else:
            extra = ""
            if auth is not None:
                import base64
                token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
                extra = f"Proxy-Authorization: Basic {token}\r\n"
            sock.sendall(http_request(host, port, extra) + pipelined)
            status, head = http_reply(sock)
            assert status == 200, head
        down = relay_rest(sock, up, replied=replied, hold=hold)
    return down


class GoodClient(GoodClientBase):
    """A client mid-transfer while a bad one is handled; verified by ``check()``."""

    def __init__(self, env: AppEnv, addr: tuple, protocol: str, seed: int = 9,
                 auth: tuple[str, str] | None = None) -> None:
        self.auth = auth
        super().__init__(env, payload(200_000, seed), addr, protocol)

    def transfer(self, addr: tuple, protocol: str) -> bytes:
        return tunnel(self.env, addr, protocol, self.env.lab.server_addr, SERVER_PORT,
                      self.up, replied=self.replied, hold=self.hold, auth=self.auth)

    def check(self) -> None:
        down = self.finish()
        assert down is not None and sha256(down) == sha256(DOWN)
        self.wait_uploaded()


def bad_client(env: AppEnv, runner: ProxyRunner, protocol: str, data: bytes,
               expect: bytes | None, reason: str, conn_log, *, prefix_reply: bytes = b"",
               eof: bool = False) -> bytes:
    """Send ``data`` while a good client relays; the answer must start with
    ``prefix_reply`` + ``expect`` (None: closed without a word) and end in a FIN."""
    creds = runner.server.config.credentials
    auth = next(iter(creds.users.items())) if creds is not None else None
    good = GoodClient(env, runner.addr, protocol, auth=auth)
    try:
        with env.client() as sock:
            sock.connect(runner.addr)
            sock.sendall(data)
            if eof:
                sock.shutdown(socket.SHUT_WR)
            answer = recv_all(sock)  # raises ConnectionResetError on a RST
    finally:
        good.check()
    if expect is None:
        assert answer == prefix_reply, answer
    else:
        assert answer.startswith(prefix_reply + expect), answer
    log_lines(conn_log, f"reason={reason}", f"mode={protocol}")
    wait_for(lambda: runner.server.open_sessions == 0, 5, "sessions closed")
    return answer


def socks_fail(rep: int) -> bytes:
    return bytes([5, rep, 0, 1]) + bytes(6)


def http_fail(status: int) -> bytes:
    return f"HTTP/1.1 {status} ".encode()


# --------------------------------------------------------------------------
# Working connections
# --------------------------------------------------------------------------

def test_transfer_over_two_paths_both_protocols(env, proxies, proto, conn_log):
    """2 MB each way through the proxy, the client leg over MPTCP with both paths."""
    runner = proxies[proto]
    up = payload(2_000_000, 3)
    big = payload(2_000_000, 4)
    env.mptcp_server.reply_fn = lambda i: big
    try:
        down = tunnel(env, runner.addr, proto, env.lab.server_addr, MPTCP_SERVER_PORT, up)
    finally:
        env.mptcp_server.reply_fn = lambda i: DOWN
    assert sha256(down) == sha256(big) and len(down) == len(big)
    wait_for(lambda: (sha256(up), len(up)) in env.mptcp_server.received, 10, "upload")
    closed = runner.wait_closed(1)[-1]
    session = closed.session
    assert closed.reason == "done", closed.reason
    assert session.client_mptcp and session.upstream_mptcp
    assert session.client_subflows >= 2, session          # kernel evidence: MPTCP_INFO
    assert closed.up == len(up) and closed.down == len(big)
    line = log_lines(conn_log, f"mode={proto}", "reason=done")[-1]
    assert "client_side=mptcp" in line and "upstream_side=mptcp" in line


def test_plain_tcp_client_and_tcp_only_target(env, proxies, proto):
    up = payload(100_000, 5)
    down = tunnel(env, proxies[proto].addr, proto, env.lab.server_addr, SERVER_PORT, up,
                  mptcp=False)
    assert sha256(down) == sha256(DOWN)
    wait_for(lambda: (sha256(up), len(up)) in env.tcp_server.received, 10, "upload")
    session = proxies[proto].wait_closed(1)[-1].session
    assert session.client_mptcp is False
    assert session.upstream_requested_mptcp and session.upstream_mptcp is False  # fallback


def test_domain_name_is_resolved_and_logged(env, proxies, proto, conn_log):
    up = payload(50_000, 6)
    down = tunnel(env, proxies[proto].addr, proto, "server.lab.example", SERVER_PORT, up)
    assert sha256(down) == sha256(DOWN)
    line = log_lines(conn_log, f"mode={proto}", "name=server.lab.example")[-1]
    assert f"target={env.lab.server_addr}:{SERVER_PORT}" in line


def test_bytes_sent_before_the_reply_are_relayed(env, proxies, proto):
    """TESTING.md: data pipelined before the reply (SOCKS5), tunnel bytes before the 200."""
    early = payload(30_000, 7)
    up = payload(70_000, 8)
    down = tunnel(env, proxies[proto].addr, proto, env.lab.server_addr, SERVER_PORT, up,
                  pipelined=early)
    assert sha256(down) == sha256(DOWN)
    want = (sha256(early + up), len(early + up))
    wait_for(lambda: want in env.tcp_server.received, 10, "early bytes + upload, in order")


def test_authentication(env, proto, conn_log):
    creds = Credentials.parse("alice:wonder land\n")
    runner = env.start(proto, credentials=creds)
    try:
        up = payload(10_000, 9)
        down = tunnel(env, runner.addr, proto, env.lab.server_addr, SERVER_PORT, up,
                      auth=("alice", "wonder land"))
        assert sha256(down) == sha256(DOWN)
        assert "user=alice" in log_lines(conn_log, f"mode={proto}", "reason=done")[-1]
        if proto == SOCKS5:
            user, pw = b"alice", b"bad"
            data = bytes.fromhex("050102") + bytes([1, 5]) + user + bytes([3]) + pw
            bad_client(env, runner, proto, data, b"\x01\x01", "socks5-bad-auth", conn_log,
                       prefix_reply=b"\x05\x02")
        else:
            answer = bad_client(env, runner, proto,
                                http_request(env.lab.server_addr, SERVER_PORT),
                                http_fail(407), "http-error:407", conn_log)
            assert b"Proxy-Authenticate: Basic" in answer
    finally:
        runner.stop()
        env.runners.remove(runner)


# --------------------------------------------------------------------------
# Bad input, SOCKS5 (TESTING.md)
# --------------------------------------------------------------------------

GREET = bytes.fromhex("050100")


def _req(env, atyp_addr: bytes, cmd: int = 1, rsv: int = 0, port: int = SERVER_PORT) -> bytes:
    return GREET + bytes([5, cmd, rsv]) + atyp_addr + struct.pack("!H", port)


SOCKS_CASES = {
    # name: (data builder, expected answer after the method reply, reason)
    "wrong-version": (lambda e: b"\x04\x01\x00\x50" + bytes(4), None, "socks5-bad-greeting"),
    "nmethods-0": (lambda e: b"\x05\x00", b"\x05\xff", "socks5-bad-greeting"),
    "only-unsupported-methods": (lambda e: b"\x05\x02\x01\x03", b"\x05\xff",
                                 "socks5-bad-greeting"),
    "bind": (lambda e: _req(e, b"\x01" + ipaddress.ip_address(e.lab.server_addr).packed, cmd=2),
             socks_fail(7), "socks5-error:7"),
    "udp-associate": (lambda e: _req(e, b"\x01" + bytes(4), cmd=3), socks_fail(7),
                      "socks5-error:7"),
    "unknown-atyp": (lambda e: _req(e, b"\x07" + bytes(4)), socks_fail(8), "socks5-error:8"),
    "rsv-not-0": (lambda e: _req(e, b"\x01" + bytes(4), rsv=1), socks_fail(1),
                  "socks5-error:1"),
    "domain-length-0": (lambda e: _req(e, b"\x03\x00"), socks_fail(1), "socks5-error:1"),
    "domain-with-nul": (lambda e: _req(e, b"\x03\x05ab\x00cd"), socks_fail(1),
                        "socks5-error:1"),
    # A name with spaces or newlines would forge connection-log lines.
    "domain-not-a-host-name": (lambda e: _req(e, b"\x03\x0ca b\nconn=9 x"), socks_fail(1),
                               "socks5-error:1"),
}


@pytest.mark.parametrize("case", sorted(SOCKS_CASES))
def test_socks5_bad_input(env, proxies, conn_log, case):
    build, expect, reason = SOCKS_CASES[case]
    data = build(env)
    prefix = b"" if case in ("wrong-version", "nmethods-0", "only-unsupported-methods") \
        else b"\x05\x00"
    bad_client(env, proxies[SOCKS5], SOCKS5, data, expect, reason, conn_log,
               prefix_reply=prefix)


def test_socks5_nmethods_255_with_a_short_list_hits_the_deadline(env, proxies, conn_log):
    start = time.monotonic()
    bad_client(env, proxies[SOCKS5], SOCKS5, b"\x05\xff\x00\x01", None,
               "handshake-timeout", conn_log)
    assert DEADLINE * 0.8 < time.monotonic() - start < DEADLINE + 3


def test_socks5_empty_username_or_password(env, conn_log):
    runner = env.start(SOCKS5, credentials=Credentials.parse("alice:pw\n"))
    try:
        for data in (bytes.fromhex("050102 0100 02") + b"pw",          # ULEN 0
                     bytes.fromhex("050102 0105") + b"alice" + b"\x00"):  # PLEN 0
            bad_client(env, runner, SOCKS5, data, b"\x01\x01", "socks5-bad-auth",
                       conn_log, prefix_reply=b"\x05\x02")
    finally:
        runner.stop()
        env.runners.remove(runner)


@pytest.mark.parametrize("proto_", [SOCKS5, HTTP_CONNECT])
def test_one_byte_per_half_second_drip_hits_one_deadline(env, proxies, conn_log, proto_):
    """One handshake deadline from accept, not one per read."""
    runner = proxies[proto_]
    good = GoodClient(env, runner.addr, proto_)
    try:
        data = socks_request(env.lab.server_addr, SERVER_PORT) if proto_ == SOCKS5 \
            else http_request(env.lab.server_addr, SERVER_PORT)
        start = time.monotonic()
        with env.client() as sock:
            sock.connect(runner.addr)
            closed = False
            for i in range(len(data)):
                try:
                    sock.send(data[i:i + 1])
                except OSError:
                    closed = True
                    break
                time.sleep(0.5)
                if time.monotonic() - start > DEADLINE + 2:
                    break
            if not closed:
                sock.settimeout(5)
                rest = recv_all(sock)
                assert rest in (b"", b"\x05\x00"), rest
        elapsed = time.monotonic() - start
        assert elapsed < DEADLINE + 2.5, elapsed
    finally:
        good.check()
    log_lines(conn_log, "reason=handshake-timeout", f"mode={proto_}")


# --------------------------------------------------------------------------
# Bad input, HTTP CONNECT (TESTING.md)
# --------------------------------------------------------------------------

def _http(env, authority: str, extra: str = "") -> bytes:
    return f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{extra}\r\n".encode()


HTTP_CASES = {
    "no-port": (lambda e: _http(e, e.lab.server_addr), 400),
    "port-0": (lambda e: _http(e, f"{e.lab.server_addr}:0"), 400),
    "headers-too-large": (lambda e: _http(e, f"{e.lab.server_addr}:{SERVER_PORT}",
                                          "X-Big: " + "a" * 9000 + "\r\n"), 431),
    "body-with-content-length": (lambda e: _http(e, f"{e.lab.server_addr}:{SERVER_PORT}",
                                                 "Content-Length: 4\r\n") + b"body", 400),
    "get": (lambda e: b"GET http://" + e.lab.server_addr.encode() + b"/ HTTP/1.1\r\n\r\n", 405),
    "post": (lambda e: b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
    "http-2": (lambda e: b"CONNECT a.example:1 HTTP/2.0\r\n\r\n", 505),
    # Exponential for a backtracking pattern: it froze the loop (review finding).
    "crafted-host-name": (lambda e: _http(e, "a" * 60 + "!:443"), 400),
}


@pytest.mark.parametrize("case", sorted(HTTP_CASES))
def test_http_connect_bad_input(env, proxies, conn_log, case):
    build, status = HTTP_CASES[case]
    answer = bad_client(env, proxies[HTTP_CONNECT], HTTP_CONNECT, build(env), http_fail(status),
                        f"http-error:{status}", conn_log)
    assert b"Connection: close" in answer


def test_http_connect_denied_port(env, conn_log):
    runner = env.start(HTTP_CONNECT, allow_ports=PortSet.parse(f"443,{SERVER_PORT}"))
    try:
        bad_client(env, runner, HTTP_CONNECT,
                   _http(env, f"{env.lab.server_addr}:{MPTCP_SERVER_PORT}"), http_fail(403),
                   "refused:port-not-allowed", conn_log)
    finally:
        runner.stop()
        env.runners.remove(runner)


# --------------------------------------------------------------------------
# Refusals both protocols share: policy, DNS, upstream failures
# --------------------------------------------------------------------------

def _connect_request(env, proto: str, host: str, port: int) -> bytes:
    return socks_request(host, port) if proto == SOCKS5 else http_request(host, port)


def _refusal(proto: str, rep: int, status: int) -> tuple[bytes, bytes]:
    """(prefix, expected answer) for a refusal after a complete request."""
    if proto == SOCKS5:
        return b"\x05\x00", socks_fail(rep)
    return b"", http_fail(status)


@pytest.mark.parametrize("target, reason", [
    ("127.0.0.1", "refused:target-not-allowed"),        # loopback
    ("::ffff:127.0.0.1", "refused:target-not-allowed"),  # mapped loopback
    ("224.0.0.1", "refused:target-not-allowed"),        # multicast
    ("proxy", "refused:target-not-allowed"),            # the proxy itself
    ("loop.lab.example", "refused:target-not-allowed"),  # resolves to loopback (rebinding)
    ("nxdomain.lab.example", "refused:resolve-failed"),
])
def test_target_refusals(env, proxies, proto, conn_log, target, reason):
    if target == "proxy":
        target = env.lab.paths[0].proxy_addr
    rep, status = (4, 502) if "resolve" in reason else (2, 403)
    prefix, expect = _refusal(proto, rep, status)
    bad_client(env, proxies[proto], proto, _connect_request(env, proto, target, SERVER_PORT),
               expect, reason, conn_log, prefix_reply=prefix)


def refused_without_good_client(env, runner, proto, data, prefix, expect, reason, conn_log):
    """For configurations that would refuse the good client too."""
    with env.client() as sock:
        sock.connect(runner.addr)
        sock.sendall(data)
        answer = recv_all(sock)
    assert answer.startswith(prefix + expect), answer
    log_lines(conn_log, f"reason={reason}", f"mode={proto}")
    wait_for(lambda: runner.server.open_sessions == 0, 5, "sessions closed")


def test_private_target_needs_allow_target(env, proto, conn_log):
    runner = env.start(proto, allow_targets=())
    try:
        prefix, expect = _refusal(proto, 2, 403)
        refused_without_good_client(
            env, runner, proto, _connect_request(env, proto, env.lab.server_addr, SERVER_PORT),
            prefix, expect, "refused:target-not-allowed", conn_log)
    finally:
        runner.stop()
        env.runners.remove(runner)


def test_client_outside_allowed_networks(env, proto, conn_log):
    runner = env.start(proto, allow_clients=parse_networks(["192.0.2.0/24"], "--allow"))
    try:
        prefix, expect = _refusal(proto, 2, 403)
        refused_without_good_client(
            env, runner, proto, _connect_request(env, proto, env.lab.server_addr, SERVER_PORT),
            prefix, expect, "refused:client-not-allowed", conn_log)
    finally:
        runner.stop()
        env.runners.remove(runner)


def test_upstream_refused(env, proxies, proto, conn_log):
    prefix, expect = _refusal(proto, 5, 502)
    bad_client(env, proxies[proto], proto,
               _connect_request(env, proto, env.lab.server_addr, 9999), expect,
               "upstream-refused", conn_log, prefix_reply=prefix)


def test_silent_upstream_times_out(env, proto, conn_log):
    with silent_upstream(env.lab) as silent:
        runner = env.start(proto, relay=RelayConfig(connect_timeout=1.0))
        try:
            prefix, expect = _refusal(proto, 6, 504)
            start = time.monotonic()
            bad_client(env, runner, proto, _connect_request(env, proto, *silent),
                       expect, "upstream-timeout", conn_log, prefix_reply=prefix)
            assert 0.9 < time.monotonic() - start < 4
        finally:
            runner.stop()
            env.runners.remove(runner)


def test_client_vanishes_mid_handshake(env, proxies, proto, conn_log):
    good = GoodClient(env, proxies[proto].addr, proto)
    try:
        with env.client() as sock:
            sock.connect(proxies[proto].addr)
            sock.sendall(b"\x05" if proto == SOCKS5 else b"CONNECT ")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        good.check()
    log_lines(conn_log, "reason=client-", f"mode={proto}")
    wait_for(lambda: proxies[proto].server.open_sessions == 0, 5, "sessions closed")


# --------------------------------------------------------------------------
# Review findings: no password oracle for refused clients; slow name lookups
# --------------------------------------------------------------------------

def test_clients_outside_allow_learn_nothing_about_passwords(env, proto, conn_log):
    runner = env.start(proto, credentials=Credentials.parse("alice:right\n"),
                       allow_clients=parse_networks(["192.0.2.0/24"], "--allow"))
    try:
        answers = []
        for password in ("right", "wrong"):
            with env.client() as sock:
                sock.connect(runner.addr)
                if proto == SOCKS5:
                    # Offers username/password only, then sends them at once.
                    sock.sendall(socks_request(env.lab.server_addr, SERVER_PORT,
                                               ("alice", password)))
                else:
                    import base64
                    token = base64.b64encode(f"alice:{password}".encode()).decode()
                    sock.sendall(http_request(env.lab.server_addr, SERVER_PORT,
                                              f"Proxy-Authorization: Basic {token}\r\n"))
                answers.append(recv_all(sock))
        assert answers[0] == answers[1], answers
        if proto == SOCKS5:
            assert answers[0] == b"\x05\xff"   # no method for it: credentials never read
        else:
            assert answers[0].startswith(http_fail(403)), answers[0]
    finally:
        runner.stop()
        env.runners.remove(runner)


def test_slow_name_lookups_time_out_with_an_answer_and_free_the_resolver(env, proto, conn_log):
    """Lookups whose client is gone are cancelled: a burst of slow names must not
    keep a later client's lookup queued behind them (4 resolver threads)."""
    runner = env.start(proto)
    try:
        slow = []
        for i in range(8):
            sock = env.client()
            sock.connect(runner.addr)
            sock.sendall(_connect_request(env, proto, f"slow{i}.lab.example", SERVER_PORT))
            slow.append(sock)
        prefix, expect = _refusal(proto, 6, 504)
        for sock in slow:
            with sock:
                answer = recv_all(sock)
            assert answer.startswith(prefix + expect), answer
        log_lines(conn_log, "reason=resolve-timeout", f"mode={proto}")
        # Four lookups still sleep; the other four were cancelled before starting,
        # so this one runs as soon as a thread is free (3 s), within the deadline
        # of a fresh handshake timer started after the sleeping ones end.
        time.sleep(1.6)
        down = tunnel(env, runner.addr, proto, "server.lab.example", SERVER_PORT, b"after")
        assert sha256(down) == sha256(DOWN)
    finally:
        runner.stop()
        env.runners.remove(runner)


@pytest.mark.parametrize("name, tried", [("multi.lab.example", "tried=1"),
                                         ("mixed.lab.example", None)])
def test_a_name_s_other_addresses_are_tried(env, proxies, proto, conn_log, name, tried):
    """A refused first address falls through to the next; a forbidden one is
    skipped without being connected to."""
    up = payload(20_000, 12)
    down = tunnel(env, proxies[proto].addr, proto, name, SERVER_PORT, up)
    assert sha256(down) == sha256(DOWN)
    line = log_lines(conn_log, f"mode={proto}", f"name={name}")[-1]
    assert f"target={env.lab.server_addr}:{SERVER_PORT}" in line and "reason=done" in line
    assert (tried in line) if tried else ("tried=" not in line)


# --------------------------------------------------------------------------
# The first hour of a new user: refusals name their target and say why
# --------------------------------------------------------------------------

def http_body(answer: bytes) -> bytes:
    """The body of an HTTP error answer, checked against its Content-Length."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    assert sep, answer
    lengths = [int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
               if line.lower().startswith(b"content-length:")]
    assert lengths == [len(body)], answer
    assert b"Connection: close" in head and b"Content-Type: text/plain" in head
    assert body.endswith(b"\n") and body.count(b"\n") == 1
    return body


def hints(caplog, *needles: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "mptcp_proxy.app_proxy" and all(n in r.getMessage() for n in needles)]


@pytest.mark.parametrize("named", [False, True])
def test_a_refused_private_target_is_logged_explained_and_hinted_once(env, proto, conn_log,
                                                                    named):
    """Issue: "the log line says target=-"; HTTP 403 "with an empty body"."""
    conn_log.set_level(logging.INFO, logger="mptcp_proxy.app_proxy")
    runner = env.start(proto, allow_targets=())
    host = "server.lab.example" if named else env.lab.server_addr
    asked = f"{host}:{SERVER_PORT}"
    label = f"{asked} ({env.lab.server_addr})" if named else asked
    k = env.lab.server_addr.split(".")[1]
    try:
        answers = []
        for _ in range(2):
            with env.client() as sock:
                sock.connect(runner.addr)
                sock.sendall(_connect_request(env, proto, host, SERVER_PORT))
                answers.append(recv_all(sock))
        lines = log_lines(conn_log, "reason=refused:target-not-allowed", f"mode={proto}")
        wait_for(lambda: runner.server.open_sessions == 0, 5, "sessions closed")
    finally:
        runner.stop()
        env.runners.remove(runner)
    for line in lines:
        assert f"target={env.lab.server_addr}:{SERVER_PORT}" in line
        assert (f"name={asked}" in line) is named
    if proto == SOCKS5:
        assert answers[0] == b"\x05\x00" + socks_fail(2)
    else:
        assert answers[0].startswith(http_fail(403))
        assert http_body(answers[0]) == (
            f"403 Forbidden: target {label} is in a private range (10.0.0.0/8); the proxy "
            "needs --allow-target 10.0.0.0/8 to reach it\n").encode()
    said = hints(conn_log, "--allow-target CIDR allows private targets")
    assert len(said) == 1, said            # two refusals, one hint (once a minute)
    assert f"refused target {label}" in said[0]
    assert "(here: --allow-target 10.0.0.0/8)" in said[0]
    assert f"10.{k}." in said[0]


@pytest.mark.parametrize("target, words", [
    ("127.0.0.1", "is a loopback address: a proxy never connects there"),
    ("loop.lab.example", "(127.0.0.1) is a loopback address"),
])
def test_http_refusals_say_why(env, proxies, conn_log, target, words):
    answer = bad_client(env, proxies[HTTP_CONNECT], HTTP_CONNECT,
                        http_request(target, SERVER_PORT), http_fail(403),
                        "refused:target-not-allowed", conn_log)
    assert words.encode() in http_body(answer)


def test_http_upstream_failures_and_bad_requests_say_why(env, proxies, conn_log):
    runner = proxies[HTTP_CONNECT]
    answer = bad_client(env, runner, HTTP_CONNECT, http_request(env.lab.server_addr, 9999),
                        http_fail(502), "upstream-refused", conn_log)
    assert http_body(answer) == (f"502 Bad Gateway: target {env.lab.server_addr}:9999 "
                                 "refused the connection\n").encode()
    answer = bad_client(env, runner, HTTP_CONNECT,
                        http_request("nxdomain.lab.example", SERVER_PORT), http_fail(502),
                        "refused:resolve-failed", conn_log)
    assert b"cannot resolve the name of target nxdomain.lab.example" in http_body(answer)
    answer = bad_client(env, runner, HTTP_CONNECT,
                        b"GET http://<b>x</b>/ HTTP/1.1\r\n\r\n", http_fail(405),
                        "http-error:405", conn_log)
    assert http_body(answer) == b"405 Method Not Allowed: this proxy only tunnels: use " \
                                b"CONNECT HOST:PORT\n"


def test_requests_refused_in_the_handshake_still_name_their_target(env, conn_log):
    """407 (bad password) and SOCKS5 port 0 happen before the proxy decides, but
    the request named a valid target: the log line says which."""
    creds = Credentials.parse("alice:right\n")
    runner = env.start(HTTP_CONNECT, credentials=creds)
    try:
        import base64
        token = base64.b64encode(b"alice:wrong").decode()
        answer = bad_client(env, runner, HTTP_CONNECT,
                            http_request(env.lab.server_addr, SERVER_PORT,
                                         f"Proxy-Authorization: Basic {token}\r\n"),
                            http_fail(407), "http-error:407", conn_log)
        assert b"wrong" in http_body(answer) and b"alice" not in http_body(answer)
        line = log_lines(conn_log, "reason=http-error:407")[-1]
        assert f"target={env.lab.server_addr}:{SERVER_PORT}" in line
    finally:
        runner.stop()
        env.runners.remove(runner)
    runner = env.start(SOCKS5)
    try:
        bad_client(env, runner, SOCKS5, socks_request("server.lab.example", 0),
                   socks_fail(2), "socks5-error:2", conn_log, prefix_reply=b"\x05\x00")
        line = log_lines(conn_log, "reason=socks5-error:2")[-1]
        assert "target=server.lab.example:0" in line
    finally:
        runner.stop()
        env.runners.remove(runner)
