"""sockinfo against the real kernel: loopback sockets in a private network namespace.

Each test makes its own namespace (``mpx-obs-<random>``) and runs its body in
a thread that entered it with setns(2), so root-namespace endpoints and
limits cannot change the subflow count, and nothing is left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from mptcp_proxy.observe import sockinfo as si

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="needs root and iproute2"),
]

MIB = 1 << 20
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)


@contextlib.contextmanager
def netns() -> Iterator[str]:
    name = f"mpx-obs-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        ip(name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def in_netns(ns: str, fn: Callable[[], T], timeout: float = 120) -> T:
    """Run ``fn`` in a fresh thread that joined ``ns``; re-raise what it raised."""
    outcome: dict[str, object] = {}

    def body() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            finally:
                os.close(fd)
            outcome["value"] = fn()
        except BaseException as e:  # handed to the test thread below
            outcome["error"] = e

    thread = threading.Thread(target=body, name=f"in-{ns}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"test body in {ns} still running after {timeout}s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def listener(proto: int, host: str = "127.0.0.1",
             family: int = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    sock.bind((host, 0))
    sock.listen()
    return sock


def connect(proto: int, addr: tuple, family: int = socket.AF_INET
            ) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    sock.settimeout(10)
    sock.connect(addr)
    return sock


def accept(lsock: socket.socket) -> socket.socket:
    lsock.settimeout(10)
    conn, _ = lsock.accept()
    conn.settimeout(10)
    return conn


def transfer(src: socket.socket, dst: socket.socket, size: int) -> None:
    """Send ``size`` random bytes src -> dst and compare SHA-256 on the far side."""
    payload = os.urandom(size)
    sender = threading.Thread(target=src.sendall, args=(payload,), name="sender")
    sender.start()
    digest = hashlib.sha256()
    got = 0
    while got < size:
        chunk = dst.recv(min(1 << 16, size - got))
        assert chunk, f"EOF after {got} of {size} bytes"
        digest.update(chunk)
        got += len(chunk)
    sender.join(10)
    assert not sender.is_alive()
    assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def handshake(a: socket.socket, b: socket.socket) -> None:
    """One byte each way: makes the MPTCP connection fully established."""
    a.sendall(b"?")
    assert b.recv(1) == b"?"
    b.sendall(b"!")
    assert a.recv(1) == b"!"


def test_mptcp_to_mptcp_one_subflow() -> None:
    def body() -> None:
        with listener(si.IPPROTO_MPTCP) as lsock, \
                connect(si.IPPROTO_MPTCP, lsock.getsockname()) as client, \
                accept(lsock) as server:
            for end in (client, server):
                assert si.is_mptcp(end) and si.is_mptcp(end.fileno())
                assert si.socket_protocol(end) == si.IPPROTO_MPTCP
                assert si.tcp_state(end) == si.TCP_ESTABLISHED

            transfer(client, server, MIB)
            wait_for(lambda: (si.mptcp_info(client).bytes_acked or 0) >= MIB,
                     "MPTCP-level ack of 1 MiB")

            c_info, s_info = si.mptcp_info(client), si.mptcp_info(server)
            assert c_info is not None and s_info is not None
            assert c_info.token != 0 and s_info.token != 0 and c_info.token != s_info.token
            assert c_info.remote_key_received and not c_info.fallback
            assert (c_info.subflows, c_info.subflows_total) == (0, 1)
            assert c_info.bytes_sent >= MIB and c_info.bytes_acked >= MIB
            assert s_info.bytes_received >= MIB

            for full in (True, False):
                (c_sub,) = si.subflows(client.fileno(), full_info=full)
                (s_sub,) = si.subflows(server, full_info=full)
                assert c_sub.id == (1 if full else None)
                assert c_sub.family == socket.AF_INET
                assert c_sub.local == client.getsockname() == s_sub.remote
                assert c_sub.remote == client.getpeername() == s_sub.local
                assert c_sub.state == si.TCP_ESTABLISHED
                # per-subflow TCP counters carry the data (+1 for the SYN in bytes_acked)
                assert c_sub.bytes_sent >= MIB and c_sub.bytes_acked >= MIB
                assert s_sub.bytes_received >= MIB

            assert si.tcp_info(client).bytes_acked >= MIB  # first subflow's TCP_INFO
            summary = si.connection_summary(client)
            assert summary["mptcp"] is True and summary["fallback"] is False
            assert summary["subflows"] == 1 and summary["token"] == c_info.token
            assert summary["bytes_sent"] >= MIB and summary["state"] == "ESTABLISHED"

    with netns() as ns:
        in_netns(ns, body)


def test_mptcp_over_ipv6_and_v4_mapped() -> None:
    def body() -> None:
        with listener(si.IPPROTO_MPTCP, "::1", socket.AF_INET6) as lsock, \
                connect(si.IPPROTO_MPTCP, lsock.getsockname(), socket.AF_INET6) as client, \
                accept(lsock) as server:
            transfer(client, server, 64 * 1024)
            (sub,) = si.subflows(client)
            assert sub.family == socket.AF_INET6
            assert sub.local == client.getsockname()[:2]
            assert sub.remote == ("::1", lsock.getsockname()[1])
        with listener(si.IPPROTO_MPTCP) as lsock, \
                connect(si.IPPROTO_MPTCP, ("::ffff:127.0.0.1", lsock.getsockname()[1]),
                        socket.AF_INET6) as client, \
                accept(lsock) as server:
            transfer(client, server, 64 * 1024)
            assert si.is_mptcp(client)
            (sub,) = si.subflows(client)
            # measured: the subflow of an AF_INET6 socket keeps the mapped form
            assert sub.family == socket.AF_INET6
            assert sub.local == client.getsockname()[:2]
            assert sub.remote == ("::ffff:127.0.0.1", lsock.getsockname()[1])

    with netns() as ns:
        in_netns(ns, body)


def test_mptcp_client_to_tcp_listener_falls_back() -> None:
    def body() -> None:
        with listener(socket.IPPROTO_TCP) as lsock, \
                connect(si.IPPROTO_MPTCP, lsock.getsockname()) as client, \
                accept(lsock) as server:
            transfer(client, server, 256 * 1024)
            assert si.is_mptcp(client) is False
            # the fallback signature: created as MPTCP, running TCP
            assert si.socket_protocol(client) == si.IPPROTO_MPTCP
            assert si.socket_protocol(server) == socket.IPPROTO_TCP
            assert si.mptcp_info(client) is None  # EOPNOTSUPP after fallback
            assert si.subflows(client) == [] and si.subflows(client, full_info=False) == []
            info = si.tcp_info(client)  # the one TCP subflow's
            assert info.state == si.TCP_ESTABLISHED and info.bytes_acked >= 256 * 1024
            summary = si.connection_summary(client)
            assert summary["mptcp"] is False and summary["fallback"] is True
            assert summary["subflows"] == 0 and summary["bytes_sent"] >= 256 * 1024
            assert "token" not in summary

    with netns() as ns:
        in_netns(ns, body)


def test_tcp_client_to_mptcp_listener() -> None:
    def body() -> None:
        with listener(si.IPPROTO_MPTCP) as lsock, \
                connect(socket.IPPROTO_TCP, lsock.getsockname()) as client, \
                accept(lsock) as server:
            transfer(client, server, 64 * 1024)
            # measured: the accepted socket is a plain TCP socket (SO_PROTOCOL 6)
            assert si.socket_protocol(server) == socket.IPPROTO_TCP
            for end in (client, server):
                assert si.is_mptcp(end) is False
                assert si.mptcp_info(end) is None
                assert si.subflows(end) == []
            summary = si.connection_summary(server)
            assert (summary["mptcp"], summary["fallback"]) == (False, False)

    with netns() as ns:
        in_netns(ns, body)


def test_plain_tcp_socket() -> None:
    with socket.socket() as unconnected:
        assert si.is_mptcp(unconnected) is False
        assert si.socket_protocol(unconnected) == socket.IPPROTO_TCP
        assert si.mptcp_info(unconnected) is None
        assert si.subflows(unconnected) == []
        assert si.tcp_state(unconnected) == si.TCP_CLOSE


def test_mptcp_listener_and_unconnected_socket() -> None:
    with listener(si.IPPROTO_MPTCP) as lsock:
        assert si.is_mptcp(lsock)
        assert si.tcp_state(lsock) == si.TCP_LISTEN
        info = si.mptcp_info(lsock)
        # measured: MPTCP_INFO on a listener succeeds with 96 zero bytes
        assert info is not None and info.length == 96 and info.token == 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, si.IPPROTO_MPTCP) as fresh:
        assert si.is_mptcp(fresh)
        assert si.tcp_state(fresh) == si.TCP_CLOSE


def test_close_wait_detected_on_fallback() -> None:
    """docs/KERNEL-FACTS.md: a fallen-back socket's TCP_INFO reads CLOSE_WAIT once the FIN arrived."""
    def body() -> None:
        with listener(socket.IPPROTO_TCP) as lsock, \
                connect(si.IPPROTO_MPTCP, lsock.getsockname()) as client:
            server = accept(lsock)
            server.sendall(b"unread bytes")
            assert si.tcp_state(client) == si.TCP_ESTABLISHED
            server.close()
            wait_for(lambda: si.tcp_state(client) == si.TCP_CLOSE_WAIT, "CLOSE_WAIT")
            assert si.tcp_state(client) == 8
            assert si.is_mptcp(client) is False
            assert si.connection_summary(client)["state"] == "CLOSE_WAIT"
            # nothing was read: the bytes and the EOF are still queued
            assert client.recv(100) == b"unread bytes"
            assert client.recv(100) == b""

    with netns() as ns:
        in_netns(ns, body)


def two_subflow_namespace(ns: str) -> None:
    ip(ns, "mptcp", "limits", "set", "subflows", "4", "add_addr_accepted", "4")
    ip(ns, "mptcp", "endpoint", "add", "127.0.0.2", "id", "5", "dev", "lo", "subflow")


def test_two_subflows() -> None:
    def body() -> None:
        with listener(si.IPPROTO_MPTCP) as lsock, \
                connect(si.IPPROTO_MPTCP, lsock.getsockname()) as client, \
                accept(lsock) as server:
            handshake(client, server)
            for end in (client, server):
                wait_for(lambda end=end: si.mptcp_info(end).subflows_total == 2, "the join")

            transfer(client, server, MIB)

            c_subs = sorted(si.subflows(client), key=lambda s: s.id)
            s_subs = si.subflows(server)
            assert [s.id for s in c_subs] == [1, 2]
            assert [s.local[0] for s in c_subs] == ["127.0.0.1", "127.0.0.2"]
            assert {s.remote for s in c_subs} == {lsock.getsockname()}
            assert {s.remote[0] for s in s_subs} == {"127.0.0.1", "127.0.0.2"}
            assert {s.local for s in s_subs} == {lsock.getsockname()}
            assert all(s.state == si.TCP_ESTABLISHED for s in c_subs + s_subs)
            legacy = si.subflows(client, full_info=False)
            assert {(s.local, s.remote) for s in legacy} == {(s.local, s.remote) for s in c_subs}

            wait_for(lambda: sum(s.bytes_acked for s in si.subflows(client)) >= MIB,
                     "subflows to ack 1 MiB")
            assert sum(s.bytes_received for s in si.subflows(server)) >= MIB

            info = si.mptcp_info(client)
            assert (info.subflows, info.subflows_total, info.local_addr_used) == (1, 2, 1)
            assert si.connection_summary(client)["subflows"] == 2
            assert si.connection_summary(server)["subflows"] == 2

    with netns() as ns:
        two_subflow_namespace(ns)
        in_netns(ns, body)


def test_subflows_total_is_a_live_count() -> None:
    """Deleting the endpoint closes its subflow and subflows_total drops back to 1."""
    def body() -> None:
        with listener(si.IPPROTO_MPTCP) as lsock, \
                connect(si.IPPROTO_MPTCP, lsock.getsockname()) as client, \
                accept(lsock) as server:
            handshake(client, server)
            wait_for(lambda: si.mptcp_info(client).subflows_total == 2, "the join")
            ip(ns, "mptcp", "endpoint", "delete", "id", "5")
            wait_for(lambda: si.mptcp_info(client).subflows_total == 1, "the subflow to close")
            assert [s.local[0] for s in si.subflows(client)] == ["127.0.0.1"]
            transfer(client, server, 64 * 1024)  # the connection lives on

    with netns() as ns:
        two_subflow_namespace(ns)
        in_netns(ns, body)


def test_bad_descriptors() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as excinfo:
            si.is_mptcp(r)
        assert excinfo.value.errno == 88  # ENOTSOCK
        assert si.connection_summary(r)["error"] == "ENOTSOCK"
    finally:
        os.close(r)
        os.close(w)
    sock = socket.socket()
    sock.close()  # fileno() is now -1
    assert si.connection_summary(sock) == {"mptcp": False, "fallback": False, "subflows": 0,
                                           "error": "EBADF"}
    with pytest.raises(OSError):
        si.tcp_info(sock)


def test_live_subflow_count_matches_mptcp_info():
    import socket as _socket

    from mptcp_proxy.observe.sockinfo import live_subflow_count, mptcp_info

    srv = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM, 262)
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    cli = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM, 262)
    cli.connect(srv.getsockname())
    acc, _ = srv.accept()
    tcp = _socket.socket()
    try:
        cli.sendall(b"x")
        assert acc.recv(1) == b"x"
        info = mptcp_info(cli)
        assert live_subflow_count(cli) == info.live_subflows == 1
        assert live_subflow_count(tcp) == 1  # plain TCP: EOPNOTSUPP means one path
    finally:
        for s in (cli, acc, srv, tcp):
            s.close()


@pytest.mark.parametrize("proto", [socket.IPPROTO_TCP, si.IPPROTO_MPTCP])
def test_tcp_option_bits_match_the_full_tcp_info(proto):
    """The 6-byte read the converter does per connection gives tcpi_options."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    cli = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
    cli.connect(srv.getsockname())
    acc, _ = srv.accept()
    try:
        for end in (cli, acc):
            bits = si.tcp_option_bits(end)
            assert bits == si.tcp_options(end)[0] == si.tcp_info(end).options
            assert bits & si.TCPI_OPT_SACK  # loopback negotiates SACK
            assert not bits & si.TCPI_OPT_SYN_DATA
    finally:
        for s in (cli, acc, srv):
            s.close()
