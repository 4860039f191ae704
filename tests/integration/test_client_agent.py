"""The client agent in a namespace lab: real nftables capture, real converter, real MPTCP.

client ns: plain-TCP test clients, the agent (in process, its reactor thread in
the namespace) with its capture table and SOCKS5 listener -> converter in the
proxy ns (in process) -> hash servers in the server ns (TCP and MPTCP).

Every transfer compares bytes; multipath and 0-RTT claims read the kernel
(MPTCP_INFO via the close log's subflow counts, TCPI_OPT_SYN_DATA via
``tfo=yes``, TcpExt:TCPFastOpenPassive in the converter's namespace).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

import pytest

from mptcp_proxy.config import Endpoint, RelayConfig
from mptcp_proxy.config_convert import ConvertConfig
from mptcp_proxy.errors import KernelError
from mptcp_proxy.kernel.nft import nft, table_exists
from mptcp_proxy.lab.traffic import SinkServer
from mptcp_proxy.modes.client_agent import DEFAULT_TABLE, TABLE_FAMILY, parse_captures
from mptcp_proxy.modes.policy import parse_networks
from mptcp_proxy.server.agent import AgentConfig, ClientAgent
from mptcp_proxy.server.convert import ConvertServer
from tests.support.lab_env import (
    MPTCP_SERVER_PORT, SERVER_PORT, LabEnv, lab_env, read_exact, recv_all,
)
from tests.support.servers import HashServer, ProxyRunner
from tests.support.traffic import payload, sha256

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

SINK_PORT = 9002                 # reads to EOF, then answers with the SHA-256 and count
CLOSED_PORT = 9009               # nothing listens: the server answers RST
DOWN = payload(200_000, 91)      # what every server sends on each connection
SECRET = b"agent-test-secret-0123456789"


# --------------------------------------------------------------------------
# The environment
# --------------------------------------------------------------------------

@dataclass
class AgentEnv(LabEnv):
    converter: ProxyRunner = None  # type: ignore[assignment]  # set by the env fixture

    @property
    def k(self) -> str:
        return self.lab.server_addr.split(".")[1]

    @property
    def denied_addr(self) -> str:
        """A private address the converter is not allowed to connect to."""
        return f"10.{self.k}.253.9"

    @property
    def converter_addr(self) -> tuple[str, int]:
        return self.converter.addr[:2]

    def captures(self) -> tuple:
        return parse_captures([f"10.{self.k}.254.0/24", f"[fd00:{self.k}:254::/64]",
                               f"10.{self.k}.253.0/24:{SERVER_PORT}"])

    def start_converter(self, **kw) -> ProxyRunner:
        allowed = parse_networks([f"10.{self.k}.254.0/24", f"fd00:{self.k}:254::/64"], "t")
        kw.setdefault("allow_targets", allowed)
        kw.setdefault("tfo_no_cookie", True)
        return self.run(lambda: ConvertServer(ConvertConfig(**self.defaults(kw))).start())

    def start_agent(self, *, converters=None, resolver=None, **kw) -> ProxyRunner:
        if converters is None:
            converters = (Endpoint(*self.converter_addr),)
        kw.setdefault("capture", self.captures())
        kw.setdefault("socks5", Endpoint("127.0.0.1", 0))
        kw.setdefault("relay", RelayConfig(connect_timeout=3))
        kw.setdefault("tfo_no_cookie", True)
        config = AgentConfig(converters=tuple(converters), **kw)
        with self.lab.client.enter():
            agent = ClientAgent(config, resolver=resolver or fake_resolver(self)).start()
        runner = ProxyRunner(agent, netns=self.lab.client.ns).start()
        self.runners.append(runner)
        return runner

    def stop(self, runner: ProxyRunner) -> None:
        runner.stop()
        if runner in self.runners:
            self.runners.remove(runner)

    def socket(self, v6: bool = False, timeout: float = 10.0) -> socket.socket:
        with self.lab.client.enter():
            sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        return sock

    def table_present(self, name: str = DEFAULT_TABLE) -> bool:
        with self.lab.client.enter():
            return table_exists(TABLE_FAMILY, name)

    def passive_tfo(self) -> int:
        return self.lab.proxy.netstat()["TcpExt"]["TCPFastOpenPassive"]


def fake_resolver(env: AgentEnv):
    names = {"server.test": [env.lab.server_addr], "server6.test": [env.lab.server_addr6],
             "denied.test": [env.denied_addr]}

    def resolve(name: str, port: int) -> list[str]:
        time.sleep(0.01)  # like a real lookup: the answer comes back from another thread
        try:
            return names[name]
        except KeyError:
            raise OSError(-2, f"no such name {name}") from None
    return resolve


@pytest.fixture(scope="module")
def env():
    with lab_env(AgentEnv, DOWN, paths=2, tcp_host="::") as e:
        sink = SinkServer(e.lab.server, e.lab.server_addr, SINK_PORT)
        try:
            e.converter = e.start_converter()
            yield e
        finally:
            sink.close()


@pytest.fixture
def agent(env):
    runner = env.start_agent()
    try:
        yield runner
    finally:
        env.stop(runner)
    assert not env.table_present(), "the capture table outlived the agent"


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def wait_received(server: HashServer, data: bytes, timeout: float = 10.0) -> None:
    """The server recorded ``data`` (its handler thread records after the close)."""
    want = (sha256(data), len(data))
    deadline = time.monotonic() + timeout
    while want not in server.received:
        assert time.monotonic() < deadline, f"server never received {want}"
        time.sleep(0.01)


def exchange(sock: socket.socket, up: bytes) -> bytes:
    """Send ``up`` then FIN while reading everything the other side sends."""
    sender = threading.Thread(target=lambda: (sock.sendall(up), sock.shutdown(socket.SHUT_WR)),
                              daemon=True)
    sender.start()
    down = recv_all(sock)
    sender.join(20)
    return down


def captured(env: AgentEnv, host: str, port: int, up: bytes) -> bytes:
    with env.socket(v6=":" in host) as sock:
        sock.connect((host, port))
        return exchange(sock, up)


def socks_request(host, port: int) -> bytes:
    if isinstance(host, str):
        try:
            host = ipaddress.ip_address(host)
        except ValueError:
            name = host.encode()
            return bytes((5, 1, 0, 3, len(name))) + name + struct.pack("!H", port)
    atyp = 1 if host.version == 4 else 4
    return bytes((5, 1, 0, atyp)) + host.packed + struct.pack("!H", port)


def read_socks_reply(sock: socket.socket) -> tuple[int, bytes]:
    """(REP, the whole reply); REP -1 when the agent closed without one."""
    head = read_exact(sock, 4)
    if len(head) < 4:
        return -1, head
    rest = read_exact(sock, {1: 4, 4: 16}.get(head[3], 0) + 2)
    return head[1], head + rest


def socks_open(env: AgentEnv, socks_addr: tuple, host, port: int, *, pipelined: bytes = b"",
               trickle: bool = False) -> tuple[socket.socket, int]:
    sock = env.socket()
    sock.connect(socks_addr)
    message = b"\x05\x01\x00" + socks_request(host, port) + pipelined
    if trickle:
        for i in range(len(message)):
            sock.send(message[i:i + 1])
            time.sleep(0.002)
    else:
        sock.sendall(message)
    assert read_exact(sock, 2) == b"\x05\x00"
    rep, _ = read_socks_reply(sock)
    return sock, rep


def socks_addr(runner: ProxyRunner) -> tuple[str, int]:
    agent: ClientAgent = runner.server
    return next(a[:2] for a in agent.listen_addresses() if a[1] == agent.socks_port)


def closed_sessions(runner: ProxyRunner, n: int, timeout: float = 10.0) -> list:
    return sorted(runner.wait_closed(n, timeout), key=lambda c: c.session.id)


def assert_clean_close(sock: socket.socket) -> None:
    """The agent closed with a FIN (read returns EOF), not a RST."""
    assert sock.recv(100) == b""


def assert_reset(sock: socket.socket) -> None:
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        sock.sendall(b"x" * 1000)
        for _ in range(50):
            if not sock.recv(1000):
                break
            time.sleep(0.01)


# --------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------

def test_captured_ipv4_and_ipv6_connections_relay_hash_verified(env, agent):
    tfo_before = env.passive_tfo()
    up4, up6 = payload(700_000, 1), payload(500_000, 2)
    assert captured(env, env.lab.server_addr, SERVER_PORT, up4) == DOWN
    assert captured(env, env.lab.server_addr6, SERVER_PORT, up6) == DOWN
    wait_received(env.tcp_server, up4)
    wait_received(env.tcp_server, up6)
    sessions = closed_sessions(agent, 2)
    for closed, host, up in zip(sessions, (env.lab.server_addr, f"[{env.lab.server_addr6}]"),
                                (up4, up6)):
        s = closed.session
        assert closed.reason == "done" and s.target == f"{host}:{SERVER_PORT}"
        assert s.extra["entry"] == "capture" and s.extra["via"] == "converter"
        assert s.extra["convert"] == "accepted" and s.extra["server_mptcp"] == "no"
        assert s.extra["tfo"] == "yes", "the Convert request did not ride in the SYN"
        assert s.upstream_mptcp is True and s.client_mptcp is False
        assert (closed.up, closed.down) == (len(up), len(DOWN))
    assert env.passive_tfo() - tfo_before >= 2
    assert env.table_present()


def test_the_converter_connection_gets_a_subflow_on_each_path(env, agent):
    up = payload(400_000, 3)
    with env.socket() as sock:
        sock.connect((env.lab.server_addr, SINK_PORT))
        sock.sendall(up[:1000])
        time.sleep(0.3)  # the path manager adds the second subflow meanwhile
        reply = exchange(sock, up[1000:])  # the sink answers once it has read to EOF
    digest, count = struct.unpack("!32sQ", reply)
    assert (digest.hex(), count) == (sha256(up), len(up))
    closed = closed_sessions(agent, 1)[0]
    assert closed.reason == "done" and closed.session.upstream_subflows == 2
    # Checksummed unless the agent uses TCP Fast Open (AgentConfig.dss_checksum).
    assert closed.session.upstream_csum is (not agent.server.config.tfo)


def test_many_concurrent_captured_connections(env, agent):
    ups = [payload(20_000 + i, 100 + i) for i in range(24)]
    results: list = [None] * len(ups)

    def one(i: int) -> None:
        results[i] = captured(env, env.lab.server_addr, SERVER_PORT, ups[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(ups))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [DOWN] * len(ups)
    assert [c.reason for c in closed_sessions(agent, len(ups))] == ["done"] * len(ups)
    for up in ups:
        wait_received(env.tcp_server, up)


def test_a_connection_to_the_listener_itself_is_not_relayed(env, agent):
    port = agent.server.capture_port
    with env.socket() as sock:
        try:
            sock.connect(("127.0.0.1", port))
        except ConnectionResetError:
            pass  # the reset may beat connect() back to an MPTCP socket
        else:
            assert_reset(sock)
    assert closed_sessions(agent, 1)[0].reason == "not-captured"


def test_converter_refusals_reset_captured_connections(env, agent):
    with env.socket() as sock:  # target not allowed by the converter: Error 32
        sock.connect((env.denied_addr, SERVER_PORT))
        assert_reset(sock)
    with env.socket() as sock:  # the server refuses: Error 96
        sock.connect((env.lab.server_addr, CLOSED_PORT))
        assert_reset(sock)
    reasons = [c.reason for c in closed_sessions(agent, 2)]
    assert reasons == ["convert-error:32", "convert-error:96"]
    assert agent.server.agent_stats.refusals == {32: 1, 96: 1}
    # ...and the agent carries on.
    assert captured(env, env.lab.server_addr, SERVER_PORT, b"after") == DOWN


def test_mptcp_capable_server_is_reached_directly_the_second_time(env, agent):
    converted_before = env.converter.server.stats.relayed
    joins = []
    for i in range(2):
        joins.append(env.lab.server.netstat()["MPTcpExt"].get("MPJoinSynRx", 0))
        up = payload(300_000, 40 + i)
        with env.socket() as sock:
            sock.connect((env.lab.server_addr, MPTCP_SERVER_PORT))
            sock.sendall(up[:1000])
            time.sleep(0.3)  # long enough for the path manager to add the second subflow
            assert exchange(sock, up[1000:]) == DOWN
        wait_received(env.mptcp_server, up)
    first, second = closed_sessions(agent, 2)
    assert first.session.extra["via"] == "converter"
    assert first.session.extra["server_mptcp"] == "yes"
    assert second.session.extra["via"] == "direct"
    assert second.session.upstream_mptcp is True and second.reason == "done"
    # Marked sockets are not captured: the direct connection, and its second
    # subflow (a join the server received), went to the server, not into the agent.
    assert env.lab.server.netstat()["MPTcpExt"].get("MPJoinSynRx", 0) > joins[1]
    assert env.converter.server.stats.relayed == converted_before + 1
    assert env.mptcp_server.accepted_mptcp[-1] is True
    time.sleep(0.2)
    assert len(agent.closed) == 2, "a subflow of the direct connection was captured"


# --------------------------------------------------------------------------
# SOCKS5
# --------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["server.test", "v4", "v6"])
def test_socks5_connect_with_pipelined_bytes(env, agent, host):
    target = {"v4": env.lab.server_addr, "v6": env.lab.server_addr6}.get(host, host)
    up = payload(300_000, 7)
    sock, rep = socks_open(env, socks_addr(agent), target, SERVER_PORT, pipelined=up[:3000])
    with sock:
        assert rep == 0
        assert exchange(sock, up[3000:]) == DOWN
    wait_received(env.tcp_server, up)
    closed = closed_sessions(agent, 1)[0]
    assert closed.reason == "done" and closed.session.extra["entry"] == "socks5"
    assert closed.up == len(up)
    assert closed.down == len(DOWN)   # the server's bytes; the SOCKS reply is not counted
    if host == "server.test":
        assert closed.session.extra["name"] == "server.test"
        assert closed.session.target == f"{env.lab.server_addr}:{SERVER_PORT}"


def test_socks5_handshake_one_byte_at_a_time(env, agent):
    sock, rep = socks_open(env, socks_addr(agent), "server6.test", SERVER_PORT, trickle=True)
    with sock:
        assert rep == 0
        assert exchange(sock, b"trickled") == DOWN


@pytest.mark.parametrize("message, expect_rep, reason", [
    (b"\x04\x01\x00\x50\x0a\x00\x00\x01\x00", None, "socks5-bad-handshake"),   # SOCKS4
    (b"\x05\x01\x02", None, "socks5-bad-handshake"),                           # only user/pass
    (b"\x05\x01\x00\x05\x02\x00\x01\x0a\x00\x00\x01\x00\x50", 7, "socks5-error:7"),  # BIND
    (b"\x05\x01\x00\x05\x01\x00\x09\x0a\x00\x00\x01\x00\x50", 8, "socks5-error:8"),  # ATYP 9
    (b"\x05\x01\x00\x05\x01\x00\x03\x00\x00\x50", 1, "socks5-error:1"),        # empty name
    (b"\x05\x01\x00" + socks_request("nowhere.test", 80), 4, "resolve-failed"),
    (b"\x05\x01\x00" + socks_request("denied.test", SERVER_PORT), 2, "convert-error:32"),
])
def test_socks5_bad_input_gets_its_reply_code_and_a_clean_close(env, agent, message,
                                                                 expect_rep, reason):
    with env.socket() as sock:
        sock.connect(socks_addr(agent))
        sock.sendall(message)
        if message[2:3] == b"\x00" and message[0] == 5:
            assert read_exact(sock, 2) == b"\x05\x00"
        elif message[0] == 5:
            assert read_exact(sock, 2) == b"\x05\xff"
        if expect_rep is None:
            assert_clean_close(sock)
        else:
            rep, _ = read_socks_reply(sock)
            assert rep == expect_rep
            assert_clean_close(sock)
    assert closed_sessions(agent, 1)[0].reason == reason
    # The agent keeps serving everyone else.
    sock, rep = socks_open(env, socks_addr(agent), env.lab.server_addr, SERVER_PORT)
    with sock:
        assert rep == 0 and exchange(sock, b"next") == DOWN


def test_socks5_converter_refusals_map_to_reply_codes(env, agent):
    for host, port, rep_expected in ((env.denied_addr, SERVER_PORT, 2),
                                     (env.lab.server_addr, CLOSED_PORT, 5)):
        sock, rep = socks_open(env, socks_addr(agent), host, port)
        with sock:
            assert rep == rep_expected
            assert_clean_close(sock)
    assert [c.reason for c in closed_sessions(agent, 2)] == ["convert-error:32",
                                                             "convert-error:96"]


# --------------------------------------------------------------------------
# Deadlines, failover, cookies, TFO
# --------------------------------------------------------------------------

def test_one_handshake_deadline_for_a_silent_converter_and_a_dripping_client(env):
    with env.lab.proxy.enter():
        silent = socket.socket()
    silent.bind((env.lab.paths[0].proxy_addr, 0))
    silent.listen(16)
    runner = env.start_agent(converters=(Endpoint(*silent.getsockname()),),
                             handshake_timeout=0.6)
    try:
        started = time.monotonic()
        with env.socket() as sock:
            sock.connect((env.lab.server_addr, SERVER_PORT))
            assert_reset(sock)
        with env.socket() as sock:  # one byte every 0.2 s never completes the request
            sock.connect(socks_addr(runner))
            request = b"\x05\x01\x00" + socks_request(env.lab.server_addr, SERVER_PORT)
            with pytest.raises((ConnectionResetError, BrokenPipeError)):
                for i in range(len(request)):
                    sock.send(request[i:i + 1])
                    time.sleep(0.2)
                sock.recv(100)
                sock.recv(100)
        elapsed = time.monotonic() - started
        assert elapsed < 5
        reasons = [c.reason for c in closed_sessions(runner, 2)]
        assert reasons == ["handshake-timeout", "handshake-timeout"]
    finally:
        env.stop(runner)
        silent.close()


def test_lookups_of_timed_out_socks5_clients_are_cancelled(env):
    """Eight slow names, each answered at the handshake deadline; the lookups
    not yet started are cancelled, so a later client's lookup runs as soon as
    one of the 4 resolver threads is free instead of behind all eight."""
    started_lookups: list[str] = []
    quick = fake_resolver(env)

    def resolve(name: str, port: int) -> list[str]:
        started_lookups.append(name)
        if name.startswith("slow"):
            time.sleep(2.0)
        return quick(name, port)

    runner = env.start_agent(resolver=resolve, handshake_timeout=0.5)
    try:
        first_sent = time.monotonic()
        slow = []
        for i in range(8):
            sock = env.socket(v6=False)
            sock.connect(socks_addr(runner))
            sock.sendall(b"\x05\x01\x00" + socks_request(f"slow{i}.test", SERVER_PORT))
            slow.append(sock)
        for sock in slow:
            with sock:
                assert read_exact(sock, 2) == b"\x05\x00"
                rep, _ = read_socks_reply(sock)
                assert rep == 1  # general SOCKS server failure
        reasons = [c.reason for c in closed_sessions(runner, 8)]
        assert reasons == ["handshake-timeout"] * 8
        # The four running lookups end 2 s after they began; the four queued
        # ones never start (uncancelled, they would hold the threads 2 s more
        # and this client's lookup would outlive its 0.5 s deadline).
        time.sleep(max(0.0, first_sent + 2.2 - time.monotonic()))
        sock, rep = socks_open(env, socks_addr(runner), "server.test", SERVER_PORT)
        with sock:
            assert rep == 0
            assert exchange(sock, b"after") == DOWN
        assert sorted(started_lookups) == ["server.test"] + [f"slow{i}.test" for i in range(4)]
    finally:
        env.stop(runner)


def test_an_unreachable_converter_is_skipped_then_avoided(env):
    dead = Endpoint(env.lab.paths[0].proxy_addr, 1)  # nothing listens: refused
    runner = env.start_agent(converters=(dead, Endpoint(*env.converter_addr)))
    try:
        for i in range(2):
            assert captured(env, env.lab.server_addr, SERVER_PORT, b"x%d" % i) == DOWN
        assert [c.reason for c in closed_sessions(runner, 2)] == ["done", "done"]
        assert runner.server._preferred == 1  # the second connection went there first
    finally:
        env.stop(runner)
    runner = env.start_agent(converters=(dead,))
    try:
        sock, rep = socks_open(env, socks_addr(runner), env.lab.server_addr, SERVER_PORT)
        sock.close()
        assert rep == 1
        assert closed_sessions(runner, 1)[0].reason == "converter-refused"
    finally:
        env.stop(runner)


def test_missing_cookie_is_retried_once_with_the_converters_cookie(env):
    converter = env.start_converter(cookie_secret=SECRET)
    runner = env.start_agent(converters=(Endpoint(*converter.addr[:2]),))
    try:
        for i in range(2):
            assert captured(env, env.lab.server_addr, SERVER_PORT, b"c%d" % i) == DOWN
        assert [c.reason for c in closed_sessions(runner, 2)] == ["done", "done"]
        assert runner.server.agent_stats.cookie_retries == 1
        reasons = [c.reason for c in converter.wait_closed(3)]
        assert reasons.count("missing-cookie") == 1
    finally:
        env.stop(runner)
        env.stop(converter)


def test_syn_data_not_acknowledged_is_noticed_and_not_sent_again(env):
    """Agent with TCP_FASTOPEN_NO_COOKIE, converter without cookie-less TFO: the first
    SYN's data is dropped (and, measured, the MPTCP connection falls back to TCP);
    later connections send the request after the handshake and stay MPTCP."""
    converter = env.start_converter(tfo_no_cookie=False)
    runner = env.start_agent(converters=(Endpoint(*converter.addr[:2]),))
    try:
        for i in range(2):
            up = payload(100_000, 60 + i)
            assert captured(env, env.lab.server_addr, SERVER_PORT, up) == DOWN
        first, second = closed_sessions(runner, 2)
        assert first.session.extra["tfo"] == "not-acked"
        assert second.session.extra["tfo"] == "no" and second.session.upstream_mptcp is True
        assert runner.server.tfo_stripped == {converter.addr[:2]}
    finally:
        env.stop(runner)
        env.stop(converter)


def test_no_tfo_sends_the_request_after_the_handshake(env):
    runner = env.start_agent(tfo=False, tfo_no_cookie=False)
    try:
        before = env.passive_tfo()
        up = payload(200_000, 70)
        assert captured(env, env.lab.server_addr, SERVER_PORT, up) == DOWN
        closed = closed_sessions(runner, 1)[0]
        assert closed.reason == "done" and closed.session.extra["tfo"] == "no"
        assert closed.session.upstream_mptcp is True and closed.up == len(up)
        assert env.passive_tfo() == before  # not even a TFO cookie request
    finally:
        env.stop(runner)


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------

def test_stale_table_is_replaced_and_one_agent_per_namespace(env):
    with env.lab.client.enter():  # what a crashed agent would have left
        nft(f"table {TABLE_FAMILY} {DEFAULT_TABLE} {{\n  chain output {{\n"
            "    type nat hook output priority -100; policy accept;\n"
            "    tcp dport 9 redirect to :1\n  }\n}\n")
    runner = env.start_agent()
    try:
        listing = env.lab.client.run(["nft", "list", "table", TABLE_FAMILY, DEFAULT_TABLE]).stdout
        assert "redirect to :1\n" not in listing and listing.count("chain output") == 1
        assert f"redirect to :{runner.server.capture_port}" in listing
        config = AgentConfig(converters=(Endpoint(*env.converter_addr),),
                             capture=env.captures())
        with env.lab.client.enter(), pytest.raises(KernelError, match="another client agent"):
            ClientAgent(config).start()
        assert env.table_present()  # the refused second agent removed nothing
        assert captured(env, env.lab.server_addr, SERVER_PORT, b"still") == DOWN
    finally:
        env.stop(runner)
    assert not env.table_present()


def test_socks5_only_agent_installs_no_table(env):
    runner = env.start_agent(capture=())
    try:
        assert not env.table_present()
        sock, rep = socks_open(env, socks_addr(runner), env.lab.server_addr, SERVER_PORT)
        with sock:
            assert rep == 0 and exchange(sock, b"socks only") == DOWN
    finally:
        env.stop(runner)
