"""Client library for RFC 8803 against a stand-in converter, in a namespace lab.

Topology: the library runs in the lab's client namespace, a stand-in converter
(a small blocking server built on the codec, defined here) in the proxy
namespace, and hash-checking servers in the server namespace. Each test gets a
fresh lab, so kernel TFO cookie caches and counters start empty.

0-RTT is proved with the kernel's counters: TcpExt TCPFastOpenActive in the
client namespace and TCPFastOpenPassive in the converter's namespace, plus
TCPI_OPT_SYN_DATA on the client socket and the converter finding the whole
request and the first application bytes readable at accept time.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Callable

import pytest

from mptcp_proxy.convert_client import (
    ConverterAvoided,
    ConverterConnectError,
    ConverterRegistry,
    ConvertTimeout,
    TfoOutcome,
    open_connection,
    open_connection_async,
    query_converter,
)
from mptcp_proxy.lab import Lab, PathSpec
from mptcp_proxy.lab import netns
from mptcp_proxy.lab.traffic import serve_each
from mptcp_proxy.modes.convert_client import (
    MP_CAPABLE_SYN_OPTION,
    REFUSALS,
    ConvertRefused,
    MptcpTargetCache,
    RefusedConnectionReset,
    RefusedMissingCookie,
)
from mptcp_proxy.observe.sockinfo import is_mptcp, tcp_info
from mptcp_proxy.wire.convert import (
    ConvertDecoder,
    ConvertErrorCode,
    ConvertMessage,
    ConvertProtocolError,
    ConvertSender,
    ErrorTlv,
    ExtendedTcpHeaderTlv,
    SupportedTcpExtTlv,
    TcpOption,
    TcpOptionKind,
    encode_message,
)
from tests.support.servers import HashServer
from tests.support.traffic import payload, recv_until_eof, send_all_and_shut, sha256

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

IPPROTO_MPTCP = 262
TCP_FASTOPEN = 23
TCP_FASTOPEN_NO_COOKIE = 34
CONVERTER_PORT = 5124
SERVER_PORT = 9000
MPTCP_SERVER_PORT = 9001
TIMEOUT = 5.0


# --------------------------------------------------------------------------
# A stand-in converter: decode with the codec, answer, relay with threads
# --------------------------------------------------------------------------

Answer = Callable[[ConvertMessage], "ConvertMessage | bytes | None"]


class StandInConverter:
    """Accepts Convert requests in ``ns``; ``answer(request)`` decides the reply.

    ``answer`` returns None (connect to the target and relay, answering with an
    Extended TCP Header that shows MP_CAPABLE when the upstream is MPTCP), a
    ConvertMessage (sent, then the connection is closed) or raw bytes (same).
    Records each request and what the first read after accept returned.
    """

    def __init__(self, ns: str, host: str, port: int = CONVERTER_PORT, *,
                 answer: Answer | None = None, tfo_no_cookie: bool = False) -> None:
        self.ns = ns
        self.answer = answer
        self.requests: list[ConvertMessage] = []
        self.first_reads: list[bytes] = []
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        with netns.enter(ns):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self.sock = socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, 64)
            if tfo_no_cookie:
                self.sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
            self.sock.bind((host, port))
            self.sock.listen(64)
            # Threads inherit the creating thread's namespace: upstream sockets live here.
            self._acceptor = serve_each(self.sock, self._handle, "stand-in", self._threads)
        self.addr = (host, port)

    def _handle(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            decoder = ConvertDecoder(ConvertSender.CLIENT)
            first = conn.recv(65536)
            self.first_reads.append(first)
            data = first
            while decoder.feed(data) is None:
                data = conn.recv(65536)
                if not data:
                    decoder.feed_eof()
            request = decoder.message
            self.requests.append(request)
            decided = self.answer(request) if self.answer else None
            if decided is not None:
                conn.sendall(decided if isinstance(decided, bytes) else encode_message(decided))
                conn.close()
                return
            self._convert(conn, request, decoder.leftover)
        except BaseException as exc:  # recorded for the test to see
            self.errors.append(exc)
            conn.close()

    def _convert(self, conn: socket.socket, request: ConvertMessage, leftover: bytes) -> None:
        connect = request.connect
        up = socket.socket(socket.AF_INET if connect.address.version == 4 else socket.AF_INET6,
                           socket.SOCK_STREAM, IPPROTO_MPTCP)
        up.settimeout(5)
        try:
            up.connect((str(connect.address), connect.port))
        except ConnectionRefusedError:
            conn.sendall(encode_message(ConvertMessage((ErrorTlv.connection_reset(),))))
            conn.close()
            up.close()
            return
        options = [TcpOption(TcpOptionKind.MSS, b"\x05\xb4")]
        if is_mptcp(up):
            options.append(TcpOption(TcpOptionKind.MPTCP, b"\x01\x81" + bytes(8)))
        conn.sendall(encode_message(ConvertMessage((ExtendedTcpHeaderTlv(tuple(options)),))))
        up.settimeout(None)
        conn.settimeout(None)
        up.sendall(leftover)
        back = threading.Thread(target=_pump, args=(up, conn), daemon=True)
        back.start()
        _pump(conn, up)
        back.join(30)
        conn.close()
        up.close()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.sock.close()
        self._acceptor.join(2)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(256 << 10):
            dst.sendall(chunk)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


class Silent:
    """A listener that accepts and never answers."""

    def __init__(self, ns: str, host: str, port: int) -> None:
        with netns.enter(ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
            self.sock.bind((host, port))
            self.sock.listen(8)
        self.addr = (host, port)

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------

class World:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.conv_host = lab.paths[0].proxy_addr
        self.converter: StandInConverter | None = None
        self.closers: list = []
        with lab.server.enter():
            self.tcp_server = HashServer(lab.server_addr, port=SERVER_PORT,
                                         reply_fn=lambda i: payload(300_000, seed=100 + i))
            self.mptcp_server = HashServer(lab.server_addr, port=MPTCP_SERVER_PORT, mptcp=True,
                                           reply_fn=lambda i: payload(300_000, seed=200 + i))
        self.closers += [self.tcp_server, self.mptcp_server]
        self.target = (lab.server_addr, SERVER_PORT)
        self.mptcp_target = (lab.server_addr, MPTCP_SERVER_PORT)
        self.cache = MptcpTargetCache(ttl=60)
        self.registry = ConverterRegistry()

    def start_converter(self, host: str | None = None, **kwargs) -> StandInConverter:
        self.converter = StandInConverter(self.lab.proxy.ns, host or self.conv_host, **kwargs)
        self.closers.append(self.converter)
        return self.converter

    def open(self, target=None, **kwargs):
        kwargs.setdefault("timeout", TIMEOUT)
        kwargs.setdefault("cache", self.cache)
        kwargs.setdefault("converters", self.registry)
        with self.lab.client.enter():
            return open_connection(self.converter.addr, target or self.target, **kwargs)

    def counters(self) -> tuple[dict[str, int], dict[str, int]]:
        return self.lab.client.netstat()["TcpExt"], self.lab.proxy.netstat()["TcpExt"]

    def close(self) -> None:
        for item in reversed(self.closers):
            item.close()


@pytest.fixture
def world():
    with Lab.create(paths=[PathSpec()]) as lab:
        # The converter's namespace serves TFO; the client's stays at the kernel
        # default (1: client only), which is what the library relies on.
        lab.proxy.sysctl("net.ipv4.tcp_fastopen", 3)
        assert lab.client.sysctl("net.ipv4.tcp_fastopen") == "1"
        w = World(lab)
        try:
            yield w
        finally:
            w.close()


def exchange(conn, up: bytes) -> tuple[str, int]:
    """Send ``up`` then EOF; read the server's reply to EOF; return its (sha, size)."""
    sender = threading.Thread(target=send_all_and_shut, args=(conn.sock, up), daemon=True)
    sender.start()
    conn.sock.settimeout(20)
    got = recv_until_eof(conn.sock)
    sender.join(20)
    return got


def finish(conn) -> None:
    """Close cleanly: EOF up, read the server's reply to EOF (no RST for the server)."""
    exchange(conn, b"")
    conn.close()


def check_transfer(world: World, server: HashServer, index: int, conn, first: bytes,
                   rest: bytes) -> None:
    got = exchange(conn, rest)
    assert got == (sha256(payload(300_000, seed=(100 if server is world.tcp_server else 200)
                                   + index)), 300_000), "server -> client bytes differ"
    # Streams are recorded at EOF, in completion order: look for ours.
    expected = (sha256(first + rest), len(first + rest))
    deadline = time.monotonic() + 10
    while expected not in server.received and time.monotonic() < deadline:
        time.sleep(0.01)
    assert expected in server.received, ("client -> server bytes differ", server.received)


# --------------------------------------------------------------------------
# 0-RTT, proved by the kernel
# --------------------------------------------------------------------------

def test_syn_carries_convert_header_and_first_bytes(world):
    conv = world.start_converter()
    first = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"
    rest = payload(200_000, seed=1)

    c0, p0 = world.counters()
    conn1 = world.open(first_bytes=first)
    c1, p1 = world.counters()
    # First contact: no cookie yet, the SYN asks for one and carries no data.
    assert conn1.tfo is TfoOutcome.NO_COOKIE and not conn1.tfo_stripped
    assert c1.get("TCPFastOpenActive", 0) == c0.get("TCPFastOpenActive", 0)
    assert p1.get("TCPFastOpenCookieReqd", 0) == p0.get("TCPFastOpenCookieReqd", 0) + 1
    assert conn1.mptcp and not conn1.direct
    assert conn1.server_mptcp is False  # the stand-in showed a SYN+ACK without MP_CAPABLE
    check_transfer(world, world.tcp_server, 0, conn1, first, rest)
    conn1.close()

    conn2 = world.open(first_bytes=first)
    c2, p2 = world.counters()
    assert conn2.tfo is TfoOutcome.ACKED
    assert tcp_info(conn2.sock).has_syn_data  # TCPI_OPT_SYN_DATA on the client socket
    assert c2["TCPFastOpenActive"] == c1.get("TCPFastOpenActive", 0) + 1
    assert p2["TCPFastOpenPassive"] == p1.get("TCPFastOpenPassive", 0) + 1
    # The converter found the request and the first bytes readable at accept time.
    request = conv.requests[1]
    assert conv.first_reads[1] == encode_message(request) + first
    assert request.connect.port == SERVER_PORT and str(request.connect.address) == \
        world.lab.server_addr
    check_transfer(world, world.tcp_server, 1, conn2, first, rest)
    conn2.close()
    assert not conv.errors


def test_tfo_without_cookie_is_0rtt_on_first_contact(world):
    world.start_converter(tfo_no_cookie=True)
    c0, p0 = world.counters()
    conn = world.open(first_bytes=b"hello", tfo_no_cookie=True)
    c1, p1 = world.counters()
    assert conn.tfo is TfoOutcome.ACKED
    assert c1["TCPFastOpenActive"] == c0.get("TCPFastOpenActive", 0) + 1
    assert p1["TCPFastOpenPassive"] == p0.get("TCPFastOpenPassive", 0) + 1
    check_transfer(world, world.tcp_server, 0, conn, b"hello", b" world")
    conn.close()


def test_client_tfo_disabled_still_converts(world):
    world.lab.client.sysctl("net.ipv4.tcp_fastopen", 0)
    world.start_converter()
    conn = world.open(first_bytes=b"abc")
    assert conn.tfo is TfoOutcome.DISABLED and not conn.tfo_stripped
    check_transfer(world, world.tcp_server, 0, conn, b"abc", b"def")
    conn.close()


def test_stripped_syn_data_is_recorded_and_data_still_arrives(world):
    conv = world.start_converter()
    finish(world.open(first_bytes=b"x"))  # fetch a cookie
    # The converter's side stops taking SYN data: the next SYN carries data and a
    # valid cookie, the SYN+ACK acknowledges only the SYN. That is what a
    # payload-stripping middlebox looks like from the client.
    world.lab.proxy.sysctl("net.ipv4.tcp_fastopen", 1)
    c0, _ = world.counters()
    first = b"first bytes in the SYN"
    conn = world.open(first_bytes=first)
    c1, _ = world.counters()
    assert conn.tfo is TfoOutcome.NOT_ACKED and conn.tfo_stripped
    assert c1["TCPFastOpenActiveFail"] == c0.get("TCPFastOpenActiveFail", 0) + 1
    assert world.registry.tfo_stripped(conv.addr)
    assert world.registry.stripped() == [conv.addr]
    check_transfer(world, world.tcp_server, 1, conn, first, payload(50_000, seed=3))
    conn.close()
    with pytest.raises(ConverterAvoided):
        world.open(first_bytes=first, avoid_stripped=True)


# --------------------------------------------------------------------------
# Data both ways, sync and asyncio
# --------------------------------------------------------------------------

def test_large_transfer_both_ways_hash_verified(world):
    world.start_converter()
    first = payload(900, seed=7)
    rest = payload(3_000_000, seed=8)
    conn = world.open(first_bytes=first)
    assert conn.reply.leftover == b""
    check_transfer(world, world.tcp_server, 0, conn, first, rest)
    conn.close()


def test_asyncio_api(world):
    world.start_converter()
    first = b"async hello"
    rest = payload(500_000, seed=9)

    async def one(index: int):
        streams = await open_connection_async(world.converter.addr, world.target,
                                              first_bytes=first, timeout=TIMEOUT,
                                              cache=world.cache, converters=world.registry)
        reader, writer = streams
        writer.write(rest)
        await writer.drain()
        writer.write_eof()
        got = await reader.read()
        writer.close()
        await writer.wait_closed()
        return streams.info, got

    with world.lab.client.enter():
        info1, got1 = asyncio.run(one(0))
        info2, got2 = asyncio.run(one(1))
    assert info1.tfo is TfoOutcome.NO_COOKIE and info2.tfo is TfoOutcome.ACKED
    assert info1.mptcp and info2.mptcp and not info2.direct
    assert info2.server_mptcp is False
    for index, got in ((0, got1), (1, got2)):
        assert sha256(got) == sha256(payload(300_000, seed=100 + index))
    assert world.tcp_server.wait_received(2) == [(sha256(first + rest), len(first + rest))] * 2


def test_asyncio_cookie_retry_then_direct(world):
    cookie = b"ASYNCCK!"
    conv = world.start_converter(answer=lambda request: None if request.cookie else
                                 ConvertMessage((ErrorTlv.missing_cookie(cookie),)))

    async def call(first: bytes):
        streams = await open_connection_async(
            conv.addr, world.mptcp_target, first_bytes=first, timeout=TIMEOUT,
            cache=world.cache, converters=world.registry,
            extended_options=(MP_CAPABLE_SYN_OPTION,))
        assert streams.reader is streams[0] and streams.writer is streams[1]
        streams.writer.write_eof()
        got = await streams.reader.read()
        streams.writer.close()
        await streams.writer.wait_closed()
        return streams.info, got

    with world.lab.client.enter():
        info1, got1 = asyncio.run(call(b"via"))
        info2, got2 = asyncio.run(call(b"direct"))
    assert info1.cookie == cookie and not info1.direct and info1.server_mptcp is True
    assert info2.direct and info2.mptcp and info2.converter is None
    assert [r.cookie is not None for r in conv.requests] == [False, True]
    assert got1 == payload(300_000, seed=200) and got2 == payload(300_000, seed=201)
    assert sorted(world.mptcp_server.wait_received(2), key=lambda r: r[1]) == [
        (sha256(b"via"), 3), (sha256(b"direct"), 6)]
    assert [p[0] for p in world.mptcp_server.peers] == [world.lab.proxy_server_side_addr,
                                                       world.lab.paths[0].client_addr]


def test_ipv6_converter_and_target(world):
    lab = world.lab
    with lab.server.enter():
        server6 = HashServer(lab.server_addr6, port=SERVER_PORT, reply_fn=lambda i: b"v6 reply")
    world.closers.append(server6)
    conv = world.start_converter(host=lab.paths[0].proxy_addr6)
    target6 = (lab.server_addr6, SERVER_PORT)
    for index in range(2):
        conn = world.open(target6, first_bytes=b"v6 hello")
        assert conn.info.converter == conv.addr and conn.mptcp
        assert exchange(conn, b" world") == (sha256(b"v6 reply"), 8)
        conn.close()
    assert conn.tfo is TfoOutcome.ACKED
    assert str(conv.requests[0].connect.address) == lab.server_addr6
    assert server6.wait_received(2) == [(sha256(b"v6 hello world"), 14)] * 2


# --------------------------------------------------------------------------
# Going direct when the converter said the server speaks MPTCP
# --------------------------------------------------------------------------

def test_direct_connection_on_second_call_when_reply_said_mptcp(world):
    conv = world.start_converter()
    conn1 = world.open(world.mptcp_target, first_bytes=b"one")
    assert conn1.server_mptcp is True and not conn1.direct
    # By default the library asks (extended Connect listing MP_CAPABLE).
    assert conv.requests[0].connect.options == (MP_CAPABLE_SYN_OPTION,)
    assert world.cache.is_mptcp(world.mptcp_target, time.monotonic())
    check_transfer(world, world.mptcp_server, 0, conn1, b"one", b"-via-converter")
    conn1.close()

    conn2 = world.open(world.mptcp_target, first_bytes=b"two")
    assert conn2.direct and conn2.mptcp and conn2.server_mptcp is True
    assert conn2.info.converter is None and conn2.reply is None
    check_transfer(world, world.mptcp_server, 1, conn2, b"two", b"-direct")
    conn2.close()
    assert len(conv.requests) == 1, "the second call went through the converter"
    peers = [peer[0] for peer in world.mptcp_server.peers]
    assert peers == [world.lab.proxy_server_side_addr, world.lab.paths[0].client_addr]
    assert all(world.mptcp_server.accepted_mptcp)

    # Without the cache the library goes through the converter again.
    conn3 = world.open(world.mptcp_target, direct_if_mptcp=False)
    assert not conn3.direct
    finish(conn3)


def test_tcp_only_server_keeps_going_through_the_converter(world):
    conv = world.start_converter()
    for _ in range(2):
        conn = world.open(first_bytes=b"q")
        assert not conn.direct and conn.server_mptcp is False
        finish(conn)
    assert len(conv.requests) == 2 and len(world.cache) == 0
    # Without a cache to fill there is nothing to ask: a base Connect.
    finish(world.open(cache=None))
    finish(world.open(extended_options=()))
    assert [r.connect.options for r in conv.requests] == [(MP_CAPABLE_SYN_OPTION,)] * 2 + [()] * 2


def test_direct_failure_forgets_and_falls_back_to_the_converter(world):
    conv = world.start_converter()
    dead = (world.lab.server_addr, 9099)  # nothing listens: direct connect is refused
    world.cache.remember(dead, time.monotonic())
    with pytest.raises(RefusedConnectionReset):  # the converter's answer for a RST
        world.open(dead)
    assert not world.cache.is_mptcp(dead, time.monotonic())
    assert len(conv.requests) == 1


# --------------------------------------------------------------------------
# Refusals and failures
# --------------------------------------------------------------------------

ERRORS = {
    ConvertErrorCode.UNSUPPORTED_VERSION: ErrorTlv.unsupported_version(),
    ConvertErrorCode.MALFORMED_MESSAGE: ErrorTlv.malformed(b"\x01\x00\x22\x63"),
    ConvertErrorCode.UNSUPPORTED_MESSAGE: ErrorTlv.unsupported_message(b"\x01\x02\x22\x63"),
    ConvertErrorCode.MISSING_COOKIE: ErrorTlv(ConvertErrorCode.MISSING_COOKIE, b"\x00"),
    ConvertErrorCode.NOT_AUTHORIZED: ErrorTlv.not_authorized(),
    ConvertErrorCode.UNSUPPORTED_TCP_OPTION: ErrorTlv.unsupported_tcp_option((30,)),
    ConvertErrorCode.RESOURCE_EXCEEDED: ErrorTlv.resource_exceeded(0),
    ConvertErrorCode.NETWORK_FAILURE: ErrorTlv.network_failure(7),
    ConvertErrorCode.CONNECTION_RESET: ErrorTlv.connection_reset(),
    ConvertErrorCode.DESTINATION_UNREACHABLE: ErrorTlv.destination_unreachable(1),
}


def test_every_error_code_is_a_typed_error_sync_and_async(world):
    current: dict[str, ErrorTlv] = {}
    world.start_converter(answer=lambda request: ConvertMessage((current["error"],)))
    for code, error in ERRORS.items():
        current["error"] = error
        with pytest.raises(REFUSALS[code]) as caught:
            world.open(first_bytes=b"refused")
        assert caught.value.code == code and caught.value.error == error

        async def attempt():
            await open_connection_async(world.converter.addr, world.target, timeout=TIMEOUT,
                                        cache=world.cache, converters=world.registry)

        with world.lab.client.enter(), pytest.raises(REFUSALS[code]) as caught_async:
            asyncio.run(attempt())
        assert caught_async.value.code == code
    assert caught.value.retry_delay_s is None  # last one: Destination Unreachable
    assert caught.value.icmp_code == 1


def test_real_upstream_refusal_is_connection_reset(world):
    world.start_converter()
    with pytest.raises(RefusedConnectionReset) as caught:
        world.open((world.lab.server_addr, 9099))
    assert isinstance(caught.value, ConvertRefused) and caught.value.code == 96


def test_missing_cookie_is_retried_with_the_converters_cookie(world):
    cookie = b"C00KIE!!"
    keep_asking = threading.Event()

    def answer(request):
        if (request.cookie is not None and request.cookie.cookie == cookie
                and not keep_asking.is_set()):
            return None  # accept and relay
        return ConvertMessage((ErrorTlv.missing_cookie(cookie),))

    conv = world.start_converter(answer=answer)
    conn = world.open(first_bytes=b"cookie please")
    assert conn.info.cookie == cookie
    check_transfer(world, world.tcp_server, 0, conn, b"cookie please", b"!")
    conn.close()
    assert [r.cookie is not None for r in conv.requests] == [False, True]
    assert world.registry.cookie(conv.addr) == cookie
    # Next time the kept cookie goes in the first request.
    finish(world.open())
    assert [r.cookie is not None for r in conv.requests] == [False, True, True]
    # A stale cookie given by the caller is replaced by the converter's, once.
    finish(world.open(cookie=b"STALE!!!"))
    assert [r.cookie.cookie for r in conv.requests[3:]] == [b"STALE!!!", cookie]
    # A converter that keeps asking is an error, not a loop: the cookie it asks
    # for is the one just sent, so there is nothing to retry with.
    keep_asking.set()
    with pytest.raises(RefusedMissingCookie) as caught:
        world.open()
    assert caught.value.cookie == cookie
    assert len(conv.requests) == 6


def test_info_query_lists_supported_kinds(world):
    world.start_converter(answer=lambda request: ConvertMessage(
        (SupportedTcpExtTlv((TcpOptionKind.MPTCP, TcpOptionKind.FAST_OPEN)),)))
    with world.lab.client.enter():
        assert query_converter(world.converter.addr, timeout=TIMEOUT) == (30, 34)
    assert world.converter.requests[0].info is not None


@pytest.mark.parametrize("garbage, code", [
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", ConvertErrorCode.UNSUPPORTED_VERSION),
    (b"\x01\x01\x00\x00", ConvertErrorCode.MALFORMED_MESSAGE),  # wrong magic
    (b"\x01\x03\x22\x63\x14", ConvertErrorCode.MALFORMED_MESSAGE),  # closed mid-message
])
def test_answers_breaking_the_protocol(world, garbage, code):
    world.start_converter(answer=lambda request: garbage)
    with pytest.raises(ConvertProtocolError) as caught:
        world.open()
    assert caught.value.code == code


def test_converter_refusing_the_connection(world):
    world.converter = StandInConverter.__new__(StandInConverter)
    world.converter.addr = (world.conv_host, 5999)  # nothing listens there
    with pytest.raises(ConverterConnectError) as caught:
        world.open()
    assert caught.value.errno == 111 and caught.value.address == (world.conv_host, 5999)


def test_silent_converter_times_out(world):
    silent = Silent(world.lab.proxy.ns, world.conv_host, 5998)
    world.closers.append(silent)
    world.converter = StandInConverter.__new__(StandInConverter)
    world.converter.addr = silent.addr
    started = time.monotonic()
    with pytest.raises(ConvertTimeout) as caught:
        world.open(timeout=0.5)
    assert 0.4 < time.monotonic() - started < 2.0
    assert "answer" in caught.value.phase
    assert isinstance(caught.value, TimeoutError)

    async def attempt():
        await open_connection_async(silent.addr, world.target, timeout=0.5,
                                    converters=world.registry)

    with world.lab.client.enter(), pytest.raises(ConvertTimeout):
        asyncio.run(attempt())


def test_library_does_not_touch_sysctls(world):
    world.start_converter()
    before = {ns: netns.sysctl(ns, "net.ipv4.tcp_fastopen") for ns in world.lab.plan.namespaces}
    finish(world.open(first_bytes=b"a"))
    finish(world.open(first_bytes=b"b", tfo_no_cookie=True))
    after = {ns: netns.sysctl(ns, "net.ipv4.tcp_fastopen") for ns in world.lab.plan.namespaces}
    assert before == after


# --------------------------------------------------------------------------
# Against the real converter (server/convert.py, another engineer's)
# --------------------------------------------------------------------------

class _RealConverter:
    def __init__(self, runner) -> None:
        self.runner = runner
        self.addr = tuple(runner.addr[:2])

    def close(self) -> None:
        self.runner.stop()


def start_real(world: World, **kw) -> _RealConverter:
    """``ConvertServer`` in the proxy namespace, targets in the lab's 10.K/16 allowed."""
    server_mod = pytest.importorskip("mptcp_proxy.server.convert")
    from mptcp_proxy.config import Endpoint, RelayConfig
    from mptcp_proxy.config_convert import ConvertConfig
    from mptcp_proxy.modes.policy import parse_networks
    from tests.support.servers import ProxyRunner

    k = world.lab.server_addr.split(".")[1]
    kw.setdefault("allow_targets", parse_networks([f"10.{k}.0.0/16", "fd00::/8"], "targets"))
    config = ConvertConfig(listen=Endpoint(world.conv_host, CONVERTER_PORT),
                           relay=RelayConfig(connect_timeout=3), **kw)
    with world.lab.proxy.enter():
        server = server_mod.ConvertServer(config).start()
    real = _RealConverter(ProxyRunner(server, netns=world.lab.proxy.ns).start())
    world.converter = real
    world.closers.append(real)
    return real


def test_real_converter_0rtt_hash_verified_both_ways(world):
    start_real(world)
    first = b"GET /real HTTP/1.1\r\n\r\n"
    rest = payload(1_000_000, seed=11)
    c0, p0 = world.counters()
    conn1 = world.open(first_bytes=first)
    assert conn1.tfo is TfoOutcome.NO_COOKIE and conn1.mptcp
    assert conn1.server_mptcp is False  # TCP-only server: no MP_CAPABLE in the answer
    check_transfer(world, world.tcp_server, 0, conn1, first, rest)
    conn1.close()
    c1, p1 = world.counters()
    conn2 = world.open(first_bytes=first)
    c2, p2 = world.counters()
    assert conn2.tfo is TfoOutcome.ACKED and tcp_info(conn2.sock).has_syn_data
    assert c2["TCPFastOpenActive"] == c1.get("TCPFastOpenActive", 0) + 1
    assert p2["TCPFastOpenPassive"] == p1.get("TCPFastOpenPassive", 0) + 1
    assert c1.get("TCPFastOpenActive", 0) == c0.get("TCPFastOpenActive", 0)
    check_transfer(world, world.tcp_server, 1, conn2, first, rest)
    conn2.close()
    assert len(world.cache) == 0


def test_real_converter_mptcp_server_then_direct(world):
    real = start_real(world)
    conn1 = world.open(world.mptcp_target, first_bytes=b"hello")
    assert conn1.server_mptcp is True and not conn1.direct
    assert conn1.reply.extended_header.mptcp_capable
    check_transfer(world, world.mptcp_server, 0, conn1, b"hello", b" via the converter")
    conn1.close()
    conn2 = world.open(world.mptcp_target, first_bytes=b"hello")
    assert conn2.direct and conn2.mptcp
    check_transfer(world, world.mptcp_server, 1, conn2, b"hello", b" direct")
    conn2.close()
    peers = [p[0] for p in world.mptcp_server.peers]
    assert peers == [world.lab.proxy_server_side_addr, world.lab.paths[0].client_addr]
    assert real.runner.server is not None


def test_real_converter_typed_errors(world):
    start_real(world)
    cases = [
        ((world.lab.server_addr, 9099), {}, RefusedConnectionReset, 96),   # server RST
        (("127.0.0.1", 80), {}, REFUSALS[ConvertErrorCode.MALFORMED_MESSAGE], 1),
        (("192.0.2.1", 80), {}, REFUSALS[ConvertErrorCode.NOT_AUTHORIZED], 32),
        (world.target, {"extended_options": (TcpOption(TcpOptionKind.TCP_AO, bytes(4)),)},
         REFUSALS[ConvertErrorCode.UNSUPPORTED_TCP_OPTION], 33),
    ]
    for target, kwargs, cls, code in cases:
        with pytest.raises(cls) as caught:
            world.open(target, first_bytes=b"x", **kwargs)
        assert caught.value.code == code, target
    assert caught.value.refused_option_kinds == (TcpOptionKind.TCP_AO,)


def test_real_converter_cookie_and_asyncio(world):
    real = start_real(world, cookie_secret=b"0123456789abcdef0123")
    conn = world.open(first_bytes=b"sync")
    assert conn.info.cookie is not None and world.registry.cookie(real.addr) == conn.info.cookie
    check_transfer(world, world.tcp_server, 0, conn, b"sync", b"!")
    conn.close()

    async def call():
        streams = await open_connection_async(real.addr, world.target, first_bytes=b"async",
                                              timeout=TIMEOUT, cache=world.cache,
                                              converters=world.registry)
        streams.writer.write(b"!")
        streams.writer.write_eof()
        got = await streams.reader.read()
        streams.writer.close()
        await streams.writer.wait_closed()
        return streams.info, got

    with world.lab.client.enter():
        info, got = asyncio.run(call())
    assert info.cookie == conn.info.cookie and info.tfo is TfoOutcome.ACKED
    assert got == payload(300_000, seed=101)
    deadline = time.monotonic() + 10
    while (sha256(b"async!"), 6) not in world.tcp_server.received and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (sha256(b"async!"), 6) in world.tcp_server.received


def test_real_converter_tfo_without_cookie(world):
    start_real(world, tfo_no_cookie=True)
    c0, p0 = world.counters()
    conn = world.open(first_bytes=b"first contact", tfo_no_cookie=True)
    c1, p1 = world.counters()
    assert conn.tfo is TfoOutcome.ACKED
    assert c1["TCPFastOpenActive"] == c0.get("TCPFastOpenActive", 0) + 1
    assert p1["TCPFastOpenPassive"] == p0.get("TCPFastOpenPassive", 0) + 1
    check_transfer(world, world.tcp_server, 0, conn, b"first contact", b"")
    conn.close()
