"""The Convert bad-input matrix (TESTING.md), against a real converter in a lab.

Every case is its own test and checks four things: the right Error code
(decoded with the codec) or the documented quiet close, a clean close (FIN
after the reply, never an immediate RST), the connection's log line, and a
good client served at the same time (its connection is open and relaying while
the bad one is handled; both directions hash-verified afterwards).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
import time

import pytest

from mptcp_proxy.config import Endpoint, RelayConfig
from mptcp_proxy.modes.policy import parse_networks
from mptcp_proxy.wire.convert import (
    MAGIC,
    ConnectTlv,
    ConvertErrorCode,
    ConvertMessage,
    CookieTlv,
    InfoTlv,
    TcpOption,
)
from tests.support.convert_env import (  # noqa: F401  (env is a fixture)
    env,
    DOWN,
    SERVER_PORT,
    ConvertEnv,
    GoodClient,
    expect_error,
    read_reply,
    request,
    tfo_send,
)
from tests.support.lab_env import (  # noqa: F401  (conn_log is a fixture)
    conn_log,
    log_lines,
    recv_all,
    wait_for,
)
from tests.support.servers import silent_upstream
from tests.support.traffic import payload, sha256

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

E = ConvertErrorCode
DEADLINE = 1.5
HEADER = struct.Struct("!BBH")
SECRET = b"bad-input-secret-0123456789"


def header(total_words: int, version: int = 1, magic: int = MAGIC) -> bytes:
    return HEADER.pack(version, total_words, magic)


def start(env: ConvertEnv, **kw):
    kw.setdefault("tfo_no_cookie", True)
    kw.setdefault("handshake_timeout", DEADLINE)
    return env.start(**kw)


@pytest.fixture
def runner(env):
    r = start(env)
    yield r
    r.stop()
    env.runners.remove(r)


def bad_request(env: ConvertEnv, runner, data: bytes, code: ConvertErrorCode | None,
                reason: str, conn_log, *, tfo: bool = True, eof: bool = False,
                sock: socket.socket | None = None):
    """Send ``data`` as a bad client while a good client is mid-transfer; check the
    reply (or the quiet close), the FIN, the log line and the good client."""
    good = GoodClient(env, runner.addr)
    try:
        sock = sock or env.client()
        with sock:
            if tfo:
                tfo_send(sock, data, runner.addr)
            else:
                sock.connect(runner.addr)
                sock.sendall(data)
            if eof:
                sock.shutdown(socket.SHUT_WR)
            if code is None:
                assert sock.recv(100) == b""   # closed with a FIN, nothing said
                error = None
            else:
                error = expect_error(sock, code)
    finally:
        good.check()
    outcome = f"convert=error:{int(code)}" if code is not None else "convert=none"
    line = log_lines(conn_log, f"reason={reason}", outcome)[0]
    assert "mode=convert" in line
    assert runner.server.open_sessions == 0 or wait_for(
        lambda: runner.server.open_sessions == 0, 5, "sessions closed")
    return error, line


# --------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------

def test_total_length_0(env, runner, conn_log):
    error, _ = bad_request(env, runner, header(0), E.MALFORMED_MESSAGE, "malformed", conn_log)
    assert error.echo.startswith(header(0))


def test_total_length_1_is_a_message_asking_for_nothing(env, runner, conn_log):
    bad_request(env, runner, header(1), E.MALFORMED_MESSAGE, "malformed", conn_log)


def test_total_length_larger_than_the_data_then_eof(env, runner, conn_log):
    data = header(16) + InfoTlv().encode()
    error, _ = bad_request(env, runner, data, E.MALFORMED_MESSAGE, "malformed", conn_log,
                           eof=True)
    assert error.echo.startswith(data)


def test_total_length_larger_than_the_data_then_the_deadline(env, runner, conn_log):
    start_time = time.monotonic()
    bad_request(env, runner, header(16) + InfoTlv().encode(), E.MALFORMED_MESSAGE,
                "handshake-timeout", conn_log)
    assert DEADLINE - 0.2 < time.monotonic() - start_time < DEADLINE + 3


def test_tlv_length_0(env, runner, conn_log):
    bad_request(env, runner, header(2) + bytes((10, 0, 0, 0)), E.MALFORMED_MESSAGE,
                "malformed", conn_log)


def test_tlv_past_the_end(env, runner, conn_log):
    data = header(3) + ConnectTlv(80, ipaddress.ip_address(env.server_addr)).encode()
    bad_request(env, runner, data, E.MALFORMED_MESSAGE, "malformed", conn_log)


def test_unknown_tlv(env, runner, conn_log):
    error, _ = bad_request(env, runner, header(2) + bytes((99, 1, 0, 0)),
                           E.UNSUPPORTED_MESSAGE, "unsupported-message", conn_log)
    assert error.echo.startswith(header(2) + bytes((99, 1)))


def test_private_range_tlv(env, runner, conn_log):
    bad_request(env, runner, header(2) + bytes((200, 1, 0, 0)), E.UNSUPPORTED_MESSAGE,
                "unsupported-message", conn_log)


def test_duplicate_tlv(env, runner, conn_log):
    connect = ConnectTlv(SERVER_PORT, ipaddress.ip_address(env.server_addr)).encode()
    data = header(11) + connect + connect
    bad_request(env, runner, data, E.MALFORMED_MESSAGE, "malformed", conn_log)


def test_version_2(env, runner, conn_log):
    error, _ = bad_request(env, runner, header(6, version=2) + bytes(20),
                           E.UNSUPPORTED_VERSION, "unsupported-version", conn_log)
    assert error.supported_versions == (1,)


def test_not_convert_at_all(env, runner, conn_log):
    bad_request(env, runner, b"\x01\x05GET / HTTP/1.1\r\n\r\n", E.MALFORMED_MESSAGE,
                "malformed", conn_log)


def test_unsupported_tcp_option_tcp_ao(env, runner, conn_log):
    data = request(env.server_addr, SERVER_PORT, options=(TcpOption(29, b"\x00\x00"),))
    error, _ = bad_request(env, runner, data, E.UNSUPPORTED_TCP_OPTION, "unsupported-option",
                           conn_log)
    assert error.refused_option_kinds == (29,)


# --------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------

@pytest.mark.parametrize("target", [
    "127.0.0.1", "::ffff:127.0.0.1", "::1", "2002:7f00:1::", "64:ff9b::7f00:1",
    "224.0.0.1", "ff02::1", "255.255.255.255", "0.0.0.0",
])
def test_connect_to_loopback_multicast_broadcast(env, runner, conn_log, target):
    data = request(target, SERVER_PORT)
    error, line = bad_request(env, runner, data + b"app bytes", E.MALFORMED_MESSAGE,
                              "target-forbidden", conn_log)
    assert error.echo[:len(data)] == data
    # The TLV carries IPv4 as IPv4-mapped (RFC 8803 §4.2.5): the codec gives it back as IPv4.
    address = ipaddress.ip_address(target)
    address = getattr(address, "ipv4_mapped", None) or address
    shown = f"[{address}]" if address.version == 6 else str(address)
    assert f" target={shown}:{SERVER_PORT} " in line     # the target asked for, not "-"


@pytest.mark.parametrize("which", ["listen-address", "server-side-address", "ipv6"])
def test_connect_to_the_converter_itself(env, runner, conn_log, which):
    target = {"listen-address": runner.addr[0],
              "server-side-address": env.lab.proxy_server_side_addr,
              "ipv6": env.lab.paths[0].proxy_addr6}[which]
    bad_request(env, runner, request(target, runner.addr[1]), E.NOT_AUTHORIZED,
                "target-denied", conn_log)
    assert runner.server.stats.accepted == 2  # the good client and the bad one: no loop


def test_connect_to_a_private_range_not_allowed(env, conn_log):
    r = start(env, allow_targets=parse_networks([f"{env.server_addr}/32"], "t"))
    try:
        k = env.server_addr.split(".")[1]
        bad_request(env, r, request(f"10.{k}.254.77", 80), E.NOT_AUTHORIZED,
                    "target-denied", conn_log)
    finally:
        r.stop()
        env.runners.remove(r)


def convert_hints(caplog, *needles: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "mptcp_proxy.convert" and all(n in r.getMessage() for n in needles)]


def test_a_refused_private_target_is_logged_and_hinted_once_a_minute(env, conn_log):
    """Issue "the first hour": the client sees Error 32, the log said target=-."""
    conn_log.set_level(logging.INFO, logger="mptcp_proxy.convert")
    r = start(env, allow_targets=parse_networks([f"{env.server_addr}/32"], "t"))
    try:
        k = env.server_addr.split(".")[1]
        target = f"10.{k}.254.77"
        _, line = bad_request(env, r, request(target, 80), E.NOT_AUTHORIZED,
                              "target-denied", conn_log)
        assert f" target={target}:80 " in line and "reason=target-denied" in line
        # Another kind of refusal gets a hint of its own; the same kind waits a minute.
        bad_request(env, r, request("127.0.0.1", 80), E.MALFORMED_MESSAGE,
                    "target-forbidden", conn_log)
        bad_request(env, r, request(f"10.{k}.254.78", 81), E.NOT_AUTHORIZED,
                    "target-denied", conn_log)
        line = log_lines(conn_log, "reason=target-denied", f"target=10.{k}.254.78:81")[0]
    finally:
        r.stop()
        env.runners.remove(r)
    said = convert_hints(conn_log, "--allow-target CIDR allows private targets")
    assert len(said) == 1, said
    assert said[0].startswith(f"convert: refused target {target}:80 (Error 32), which is in "
                              "a private range (10.0.0.0/8)")
    assert "(here: --allow-target 10.0.0.0/8)" in said[0]
    assert len(convert_hints(conn_log, "127.0.0.1:80", "loopback")) == 1


# --------------------------------------------------------------------------
# Segmentation and timing
# --------------------------------------------------------------------------

def test_header_split_across_segments_works(env, runner, conn_log):
    good = GoodClient(env, runner.addr)
    up = payload(200_000, 41)
    data = request(env.server_addr, SERVER_PORT) + up
    try:
        with env.client() as sock:
            sock.connect(runner.addr)
            for piece in (data[:3], data[3:9], data[9:23], data[23:]):
                sock.sendall(piece)
                time.sleep(0.05)
            reply, leftover = read_reply(sock)
            sock.shutdown(socket.SHUT_WR)
            down = leftover + recv_all(sock)
    finally:
        good.check()
    assert reply == ConvertMessage(()) and down == DOWN
    wait_for(lambda: (sha256(up), len(up)) in env.tcp_server.received, what="upload")
    log_lines(conn_log, "reason=done", "convert=connect", "tfo=no")


def test_header_after_the_handshake_without_tfo_works(env, runner, conn_log):
    good = GoodClient(env, runner.addr)
    up = payload(100_000, 42)
    try:
        with env.client(no_cookie=False) as sock:
            sock.connect(runner.addr)
            time.sleep(0.1)  # clearly after the handshake
            sock.sendall(request(env.server_addr, SERVER_PORT) + up)
            reply, leftover = read_reply(sock)
            sock.shutdown(socket.SHUT_WR)
            down = leftover + recv_all(sock)
    finally:
        good.check()
    assert reply.error is None and down == DOWN
    wait_for(lambda: (sha256(up), len(up)) in env.tcp_server.received, what="upload")
    log_lines(conn_log, "reason=done", "tfo=no")


def test_one_byte_per_half_second_drip_hits_one_deadline(env, runner, conn_log):
    """A drip that never stops: the deadline counts from accept, not per read."""
    good = GoodClient(env, runner.addr)
    data = request(env.server_addr, SERVER_PORT)
    start_time = time.monotonic()
    try:
        with env.client() as sock:
            sock.connect(runner.addr)
            message = None
            for byte in data:
                try:
                    sock.send(bytes((byte,)))
                except OSError:
                    break
                sock.settimeout(0.5)
                try:
                    message = read_reply(sock)[0]
                    break
                except (TimeoutError, socket.timeout):
                    continue
            assert message is not None and message.error.code == E.MALFORMED_MESSAGE
            # Measured here: the parallel good client's own time must not count.
            elapsed = time.monotonic() - start_time
            sock.settimeout(5)
            assert sock.recv(10) == b""
    finally:
        good.check()
    assert DEADLINE - 0.2 < elapsed < DEADLINE + 1.5, elapsed
    log_lines(conn_log, "reason=handshake-timeout", "convert=error:1")


def test_silent_client_is_closed_quietly_at_the_deadline(env, runner, conn_log):
    with env.client() as sock:
        sock.connect(runner.addr)
        start_time = time.monotonic()
        bad_request(env, runner, b"", None, "handshake-timeout", conn_log, tfo=False,
                    sock=_already_connected(sock))
    assert time.monotonic() - start_time >= DEADLINE - 0.2


class _already_connected:
    """Wraps a connected socket so that bad_request's connect/send are no-ops."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def connect(self, addr):
        return None

    def sendall(self, data):
        return None

    def __getattr__(self, name):
        return getattr(self._sock, name)


# --------------------------------------------------------------------------
# Cookies, clients, limits
# --------------------------------------------------------------------------

def test_missing_cookie_when_cookies_are_on(env, conn_log):
    r = start(env, cookie_secret=SECRET)
    try:
        # The good client needs a cookie too: fetch one first.
        with env.client() as sock:
            tfo_send(sock, request(env.server_addr, SERVER_PORT), r.addr)
            cookie = expect_error(sock, E.MISSING_COOKIE).cookie
        good_request = request(env.server_addr, SERVER_PORT, cookie=cookie)
        error = _with_cookie_good_client(env, r, good_request, request(
            env.server_addr, SERVER_PORT), E.MISSING_COOKIE, "missing-cookie", conn_log)
        assert error.cookie == cookie   # same client, same window: same cookie
    finally:
        r.stop()
        env.runners.remove(r)


def test_bad_cookie_when_cookies_are_on(env, conn_log):
    r = start(env, cookie_secret=SECRET)
    try:
        with env.client() as sock:
            tfo_send(sock, request(env.server_addr, SERVER_PORT), r.addr)
            cookie = expect_error(sock, E.MISSING_COOKIE).cookie
        forged = bytes(b ^ 0x5A for b in cookie)
        _with_cookie_good_client(
            env, r, request(env.server_addr, SERVER_PORT, cookie=cookie),
            request(env.server_addr, SERVER_PORT, cookie=forged), E.NOT_AUTHORIZED,
            "bad-cookie", conn_log)
    finally:
        r.stop()
        env.runners.remove(r)


def _with_cookie_good_client(env, r, good_request: bytes, bad: bytes, code, reason, conn_log):
    """Like bad_request, with a good client that presents a valid cookie."""
    up = payload(150_000, 43)
    with env.client() as good:
        tfo_send(good, good_request + up[:500], r.addr)
        reply, leftover = read_reply(good)
        assert reply.error is None, reply
        with env.client() as sock:
            tfo_send(sock, bad, r.addr)
            error = expect_error(sock, code)
        good.sendall(up[500:])
        good.shutdown(socket.SHUT_WR)
        assert leftover + recv_all(good) == DOWN
    wait_for(lambda: (sha256(up), len(up)) in env.tcp_server.received, what="upload")
    log_lines(conn_log, f"reason={reason}", f"convert=error:{int(code)}")
    return error


def test_client_outside_the_allowed_networks(env, conn_log):
    client4 = env.lab.paths[0].client_addr
    r = start(env, listen=Endpoint("::", 0),
              allow_clients=parse_networks([f"{client4}/32"], "--allow"))
    try:
        addr6 = (env.lab.paths[0].proxy_addr6, r.addr[1])
        good = GoodClient(env, (env.proxy_addr, r.addr[1]))
        try:
            with env.client(v6=True) as sock:
                tfo_send(sock, request(env.server_addr, SERVER_PORT), addr6)
                expect_error(sock, E.NOT_AUTHORIZED)
        finally:
            good.check()
        log_lines(conn_log, "reason=client-not-allowed", "convert=error:32")
    finally:
        r.stop()
        env.runners.remove(r)


def test_too_many_pending_handshakes_from_one_client(env, conn_log):
    r = start(env, max_pending_per_client=1)
    try:
        good = GoodClient(env, r.addr)   # relaying: no longer pending
        try:
            with env.client() as idle:
                idle.connect(r.addr)     # holds the one pending slot
                wait_for(lambda: len(r.server.pending) == 1, 5, "idle handshake pending")
                with env.client() as sock:
                    tfo_send(sock, request(env.server_addr, SERVER_PORT), r.addr)
                    error = expect_error(sock, E.RESOURCE_EXCEEDED)
                assert error.retry_delay_s == 0
        finally:
            good.check()
        log_lines(conn_log, "reason=client-over-limit", "convert=error:64")
    finally:
        r.stop()
        env.runners.remove(r)


def test_error_replies_are_rate_limited_per_client(env, conn_log):
    r = start(env, error_rate=0.1, error_burst=2)
    try:
        good = GoodClient(env, r.addr)
        answered = []
        try:
            for _ in range(4):
                with env.client() as sock:
                    tfo_send(sock, header(0), r.addr)
                    data = recv_all(sock)       # an Error, or nothing: a clean EOF either way
                    answered.append(bool(data))
        finally:
            good.check()
        assert answered == [True, True, False, False]
        assert r.server.convert_stats.rate_limited == 2
        lines = log_lines(conn_log, "reply=rate-limited", "convert=error:1")
        assert len(lines) >= 2
    finally:
        r.stop()
        env.runners.remove(r)


# --------------------------------------------------------------------------
# Upstream failures
# --------------------------------------------------------------------------

def test_upstream_refused(env, runner, conn_log):
    bad_request(env, runner, request(env.server_addr, 9999) + b"early", E.CONNECTION_RESET,
                "upstream-refused", conn_log)


def test_silent_upstream_times_out_with_network_failure(env, conn_log):
    with silent_upstream(env.lab) as silent:
        r = start(env, relay=RelayConfig(connect_timeout=1.0), network_retry=9)
        try:
            start_time = time.monotonic()
            error, _ = bad_request(env, r, request(*silent), E.NETWORK_FAILURE,
                                   "upstream-timeout", conn_log)
            assert error.retry_delay_s == 9
            assert 0.9 < time.monotonic() - start_time < 4
        finally:
            r.stop()
            env.runners.remove(r)


def test_client_reset_during_handshake_is_logged(env, runner, conn_log):
    good = GoodClient(env, runner.addr)
    try:
        with env.client() as sock:
            sock.connect(runner.addr)
            sock.send(header(6)[:2])
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        good.check()
    log_lines(conn_log, "reason=client-reset")


def test_cookie_tlv_is_ignored_when_cookies_are_off(env, runner, conn_log):
    data = ConvertMessage((ConnectTlv(SERVER_PORT, ipaddress.ip_address(env.server_addr)),
                           CookieTlv(b"12345678"))).encode()
    with env.client() as sock:
        tfo_send(sock, data + b"hi", runner.addr)
        reply, leftover = read_reply(sock)
        sock.shutdown(socket.SHUT_WR)
        assert reply.error is None and leftover + recv_all(sock) == DOWN
