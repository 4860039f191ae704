"""Bytes written to a TFO-accepted MPTCP socket before the third ACK (Linux 6.18).

The kernel fact behind ``dataplane/establish.py``, and the workaround, on a lab
path with 20 ms of delay each way (so the server writes while the socket is
still in SYN_RECV). Each case: a client sends 5 bytes in its SYN (TFO, no
cookie); the server accepts, reads them and writes 1 KiB at once.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from mptcp_proxy.dataplane.establish import EstablishWatcher
from mptcp_proxy.observe.sockinfo import TCP_SYN_RECV, tcp_state
from mptcp_proxy.dataplane.reactor import Reactor
from mptcp_proxy.lab import Lab, PathSpec

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

IPPROTO_MPTCP = 262
TCP_FASTOPEN = 23
TCP_FASTOPEN_NO_COOKIE = 34
DELAY_MS = 20
ANSWER = bytes(range(256)) * 4


@pytest.fixture(scope="module")
def lab():
    with Lab.create([PathSpec(delay_ms=DELAY_MS)]) as lab:
        lab.proxy.sysctl("net.ipv4.tcp_fastopen", 3)
        yield lab


def tfo_exchange(lab: Lab, port: int, mptcp: bool, after_write, timeout: float = 2.0):
    """(answer bytes received, seconds to receive them or None, server socket state
    seen right after accept)."""
    addr = (lab.paths[0].proxy_addr, port)
    proto = IPPROTO_MPTCP if mptcp else 0
    with lab.proxy.enter():
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, 16)
    listener.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
    listener.bind(addr)
    listener.listen(8)
    seen: dict = {}
    done = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            seen["state"] = tcp_state(conn)
            assert conn.recv(100) == b"hello"
            conn.sendall(ANSWER)
            after_write(conn)
            done.wait(timeout + 1)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    with lab.client.enter():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
    with sock, listener:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
        sock.settimeout(timeout)
        start = time.monotonic()
        assert sock.sendto(b"hello", socket.MSG_FASTOPEN, addr) == 5
        got, elapsed = b"", None
        try:
            while len(got) < len(ANSWER):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                got += chunk
            elapsed = time.monotonic() - start
        except socket.timeout:
            pass
        done.set()
        server.join(timeout + 2)
    return got, elapsed, seen.get("state")


def test_plain_tcp_sends_at_once(lab):
    got, elapsed, state = tfo_exchange(lab, 7100, mptcp=False, after_write=lambda c: None)
    assert state == TCP_SYN_RECV
    assert got == ANSWER
    assert elapsed < 1.5 * 2 * DELAY_MS / 1000    # one round trip: 0-RTT


def test_mptcp_early_bytes_without_the_watcher_kernel_fact(lab, record_property):
    """What this kernel does with bytes written in SYN_RECV, with no help from us.

    Two behaviours are seen on Linux 6.18 builds: earlier ones keep the bytes
    queued after the third ACK until something pushes the socket (hence the
    watcher); 6.18.44 sends them when the third ACK arrives. The product works
    with either (the watcher's test below), so this probe only records which
    way the kernel went and checks what both have in common: nothing leaves
    before the handshake completes (two round trips, not TFO's one), and what
    leaves is the whole answer, intact.
    """
    rtt = 2 * DELAY_MS / 1000
    got, elapsed, state = tfo_exchange(lab, 7101, mptcp=True, after_write=lambda c: None,
                                       timeout=1.0)
    assert state == TCP_SYN_RECV
    behaviour = "held-until-pushed" if got == b"" else "sent-at-third-ack"
    record_property("kernel_early_bytes", behaviour)
    print(f"kernel: bytes written in SYN_RECV are {behaviour}")
    if got:
        assert got == ANSWER
        assert elapsed is not None and 1.8 * rtt < elapsed < 2 * rtt + 0.1, elapsed
    else:
        assert elapsed is None


def test_watcher_releases_them_once_established(lab):
    reactor = Reactor()
    watcher = EstablishWatcher(reactor)
    loop = threading.Thread(target=reactor.run, daemon=True)
    loop.start()
    results: list[bool] = []
    try:
        def watch(conn: socket.socket) -> None:
            ready = threading.Event()

            def add() -> None:
                results.append(watcher.watch(conn))
                ready.set()
            reactor.call_soon_threadsafe(add)
            ready.wait(2)
            deadline = time.monotonic() + 2
            while len(watcher) and time.monotonic() < deadline:
                time.sleep(0.005)

        got, elapsed, state = tfo_exchange(lab, 7102, mptcp=True, after_write=watch)
    finally:
        reactor.call_soon_threadsafe(reactor.stop)
        loop.join(5)
        reactor.close()
    assert state == TCP_SYN_RECV and results == [True]
    assert got == ANSWER
    rtt = 2 * DELAY_MS / 1000
    # Sent when the third ACK arrives: two round trips, plus at most a tick or two.
    assert 1.8 * rtt < elapsed < 2 * rtt + 0.02, elapsed
    assert watcher.pushed == 1 and watcher.expired == 0 and len(watcher) == 0


def test_converter_answers_a_0rtt_request_across_a_delayed_path(lab):
    """The converter's reply and the server's first bytes are written before the
    client's third ACK arrives; they must reach the client (two round trips)."""
    from mptcp_proxy.config import Endpoint, RelayConfig
    from mptcp_proxy.config_convert import ConvertConfig
    from mptcp_proxy.convert_client import TfoOutcome, open_connection
    from mptcp_proxy.modes.policy import parse_networks
    from mptcp_proxy.server.convert import ConvertServer
    from tests.support.servers import HashServer, ProxyRunner
    from tests.support.traffic import sha256

    with lab.server.enter():
        server = HashServer(lab.server_addr, reply_fn=lambda i: ANSWER)
    k = lab.server_addr.split(".")[1]
    config = ConvertConfig(listen=Endpoint(lab.paths[0].proxy_addr, 0), tfo_no_cookie=True,
                           allow_targets=parse_networks([f"10.{k}.0.0/16"], "t"),
                           relay=RelayConfig(connect_timeout=3))
    with lab.proxy.enter():
        converter = ConvertServer(config).start()
    runner = ProxyRunner(converter, netns=lab.proxy.ns).start()
    try:
        start = time.monotonic()
        with lab.client.enter():
            conn = open_connection(runner.addr, server.addr, first_bytes=b"request",
                                   tfo_no_cookie=True, cache=None, timeout=3)
        with conn:
            assert conn.tfo is TfoOutcome.ACKED
            conn.sock.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := conn.recv(65536):
                got += chunk
        elapsed = time.monotonic() - start
        assert got == ANSWER
        assert elapsed < 3 * 2 * DELAY_MS / 1000, elapsed   # not stuck until a timeout
        assert server.wait_received(1) == [(sha256(b"request"), 7)]
        assert converter.establish.pushed >= 1
    finally:
        runner.stop()
        server.close()
