"""`forward` mode on loopback: real MPTCP and TCP sockets, real kernel fallback."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from mptcp_proxy.config import Endpoint, ForwardConfig, RelayConfig, UpstreamMode
from mptcp_proxy.server.forward import ForwardServer
from tests.support.servers import HashServer, ProxyRunner
from tests.support.traffic import (
    connect, is_mptcp, listener, payload, recv_until_eof, send_all_and_shut, sha256,
)


def make_proxy(target: tuple, upstream: UpstreamMode = UpstreamMode.AUTO, **relay_kw):
    relay_kw.setdefault("connect_timeout", 3.0)
    config = ForwardConfig(listen=Endpoint("127.0.0.1", 0),
                           target=Endpoint(target[0], target[1]),
                           upstream=upstream, relay=RelayConfig(**relay_kw))
    return ProxyRunner(ForwardServer(config).start()).start()


@pytest.fixture
def tcp_server():
    srv = HashServer(mptcp=False, reply_fn=lambda i: payload(100_000 + i, i))
    yield srv
    srv.close()


def roundtrip(proxy_addr, up: bytes, mptcp: bool = True):
    with connect(proxy_addr, mptcp=mptcp) as c:
        client_mptcp = is_mptcp(c)
        t = threading.Thread(target=send_all_and_shut, args=(c, up), daemon=True)
        t.start()
        got = recv_until_eof(c)
        t.join(10)
    return got, client_mptcp


def test_mptcp_client_to_tcp_server_auto_fallback_then_tcp(tcp_server):
    proxy = make_proxy(tcp_server.addr)
    try:
        up = payload(3 << 20, 42)
        for i in range(2):
            got, client_mptcp = roundtrip(proxy.addr, up)
            expected = payload(100_000 + i, i)
            assert got == (sha256(expected), len(expected))
            assert client_mptcp
        closed = sorted(proxy.wait_closed(2), key=lambda c: c.session.id)
        assert tcp_server.wait_received(2) == [(sha256(up), len(up))] * 2
        first, second = closed[0].session, closed[1].session
        assert first.client_mptcp is True
        # First attempt asks for MPTCP, the kernel falls back: detected and reported.
        assert first.upstream_requested_mptcp and first.upstream_mptcp is False
        assert first.side(first.upstream_mptcp, first.upstream_requested_mptcp) == "fallback"
        # The target is now remembered as TCP-only: plain TCP next time.
        assert second.upstream_requested_mptcp is False and second.upstream_mptcp is False
        assert [c.reason for c in closed] == ["done", "done"]
        assert (closed[0].up, closed[0].down) == (len(up), 100_000)
    finally:
        proxy.stop()


def test_mptcp_server_gets_mptcp_upstream():
    srv = HashServer(mptcp=True, reply_fn=lambda i: payload(5000, 7))
    proxy = make_proxy(srv.addr, UpstreamMode.AUTO)
    try:
        got, _ = roundtrip(proxy.addr, payload(70_000, 8))
        assert got == (sha256(payload(5000, 7)), 5000)
        closed = proxy.wait_closed(1)
        assert closed[0].session.upstream_mptcp is True
        assert srv.accepted_mptcp == [True]
    finally:
        proxy.stop()
        srv.close()


def test_plain_tcp_client_is_served_through_fallback(tcp_server):
    proxy = make_proxy(tcp_server.addr)
    try:
        got, client_mptcp = roundtrip(proxy.addr, payload(10_000, 1), mptcp=False)
        assert got == (sha256(payload(100_000, 0)), 100_000)
        assert client_mptcp is False
        closed = proxy.wait_closed(1)
        assert closed[0].session.client_mptcp is False
        assert closed[0].reason == "done"
    finally:
        proxy.stop()


def test_upstream_tcp_mode_never_asks_for_mptcp():
    srv = HashServer(mptcp=True, reply_fn=lambda i: b"hi")
    proxy = make_proxy(srv.addr, UpstreamMode.TCP)
    try:
        assert roundtrip(proxy.addr, b"x")[0] == (sha256(b"hi"), 2)
        assert srv.accepted_mptcp == [False]
        assert proxy.wait_closed(1)[0].session.upstream_requested_mptcp is False
    finally:
        proxy.stop()
        srv.close()


def test_upstream_refused_resets_client_promptly_and_keeps_serving(tcp_server):
    dead = listener()
    dead_addr = dead.getsockname()
    dead.close()  # nothing listens there now: connection refused
    proxy = make_proxy(dead_addr)
    try:
        start = time.monotonic()
        # On loopback the RST can even beat connect()'s return: all inside raises.
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            with connect(proxy.addr, mptcp=True) as c:
                c.settimeout(5)
                c.sendall(b"hello")
                c.recv(10)
        assert time.monotonic() - start < 1.0
        closed = proxy.wait_closed(1)
        assert closed[0].reason == "upstream-refused"
        assert proxy.server.stats.rejected == 1
    finally:
        proxy.stop()


def test_upstream_silent_connect_timeout():
    # A listener whose accept queue is full drops further SYNs: a silent target.
    silent = listener(backlog=0)
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(silent.getsockname())
            fillers.append(s)
        time.sleep(0.2)
        proxy = make_proxy(silent.getsockname(), UpstreamMode.TCP, connect_timeout=0.5)
        try:
            start = time.monotonic()
            with pytest.raises(ConnectionResetError):
                with connect(proxy.addr, mptcp=True) as c:
                    c.settimeout(5)
                    c.recv(10)
            elapsed = time.monotonic() - start
            assert 0.4 < elapsed < 3.0
            assert proxy.wait_closed(1)[0].reason == "upstream-timeout"
        finally:
            proxy.stop()
    finally:
        for s in fillers:
            s.close()
        silent.close()


def test_fallback_close_trap_no_hung_connection():
    """Forced MPTCP upstream toward a plain-TCP server that sends 1 KiB and closes.

    Every upstream socket falls back; a relay that misses one server FIN would
    leave a client waiting forever. 2,000 connections, each must end in time.
    """
    srv = HashServer(mptcp=False, reply_fn=lambda i: payload(1024, 5), mode="send-close")
    proxy = make_proxy(srv.addr, UpstreamMode.MPTCP)
    n, workers = 2000, 16
    failures: list[str] = []
    lock = threading.Lock()
    counter = iter(range(n))

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                with connect(proxy.addr, mptcp=True, timeout=10) as c:
                    got = recv_until_eof(c)
                    if got != (sha256(payload(1024, 5)), 1024):
                        failures.append(f"conn {i}: bad data {got}")
            except OSError as exc:  # a socket timeout here is the hang we look for
                failures.append(f"conn {i}: {exc!r}")

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not failures, failures[:5]
        closed = proxy.wait_closed(n, timeout=30)
        assert all(c.session.upstream_requested_mptcp for c in closed)
        assert all(c.session.upstream_mptcp is False for c in closed)
        assert proxy.server.open_sessions == 0
    finally:
        proxy.stop()
        srv.close()


def test_max_connections_queues_instead_of_failing(tcp_server):
    proxy = make_proxy(tcp_server.addr, max_connections=3)
    try:
        held = [connect(proxy.addr, mptcp=True) for _ in range(3)]
        time.sleep(0.2)
        extra = connect(proxy.addr, mptcp=True)  # completes in the kernel backlog
        time.sleep(0.3)
        assert proxy.server.open_sessions == 3
        held[0].close()
        send_all_and_shut(extra, b"late")
        expected = payload(100_000 + 3, 3)
        extra.settimeout(10)
        got = recv_until_eof(extra)
        assert got[1] == len(expected)
        extra.close()
        for c in held[1:]:
            c.close()
    finally:
        proxy.stop()
