"""`convert` mode in a namespace lab: real TFO, real MPTCP, hash-verified relays.

client ns (MPTCP + TFO raw client) -> converter in the proxy ns -> servers in the
server ns. The Convert header rides the SYN (sendto MSG_FASTOPEN); the kernel's
evidence is read, not assumed: TCPI_OPT_SYN_DATA on the accepted socket
(``tfo=yes`` in the log line) and TcpExt:TCPFastOpenPassive in the converter's
namespace; TCPFastOpenPassive in the server's namespace for the upstream SYN.

The helpers live in ``tests/support/convert_env.py``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time

import pytest

from mptcp_proxy.config import Endpoint
from mptcp_proxy.modes.convert import CookieAuthority
from mptcp_proxy.wire.convert import ConvertMessage, InfoTlv, TcpOption, TcpOptionKind
from tests.support.convert_env import (  # noqa: F401  (env is a fixture)
    DOWN, E, MPTCP_OPTION, SERVER_PORT, TCP_FASTOPEN, env, expect_error, read_reply,
    request, tfo_send, transfer,
)
from tests.support.lab_env import (  # noqa: F401  (conn_log is a fixture)
    conn_log, log_lines, recv_all, wait_for,
)
from tests.support.servers import HashServer
from tests.support.traffic import payload, sha256

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

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
    assert (closed.up, closed.down) == (len(up), len(DOWN))   # the reply is not counted
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


def test_two_converters_in_one_namespace_share_the_tfo_sysctl(env):
    """The first to stop must not take the TFO bits from under the second; the
    last one restores the value found before either started."""
    key = "net.ipv4.tcp_fastopen"
    before = env.lab.proxy.sysctl(key)
    first = env.start(tfo_no_cookie=True)
    second = env.start(tfo_no_cookie=True)
    try:
        assert int(env.lab.proxy.sysctl(key)) & 0x3 == 0x3
        first.stop()
        env.runners.remove(first)
        assert int(env.lab.proxy.sysctl(key)) & 0x3 == 0x3
        reply, down = transfer(env, second.addr, payload(10_000, 3))
        assert reply.error is None and down == DOWN
        assert second.wait_closed(1)[0].session.extra["tfo"] == "yes"
    finally:
        second.stop()
        env.runners.remove(second)
    assert env.lab.proxy.sysctl(key) == before
