"""Data integrity of multipath transfers through every mode, and the DSS checksum switch.

Linux 6.18 can deliver wrong bytes on multipath MPTCP connections, with DSS
checksums or without (docs/kernel/dss-corruption.md); which is worse depends
on the mode (README, "Data integrity"): with checksums, 27 of 1,000 0-RTT
uploads through the converter arrived wrong and none of 2,400 through the
other modes; without, 1 of 2,000 through the converter and 6 of 3,400
through SOCKS5 and HTTP CONNECT. So each mode has its own default. This test
checks what the product relies on, in the lab shape and traffic pattern where
the faults show (two 100 Mbit/s paths, the second subflow joining at once,
both directions busy): hashed transfers through each mode with its default
settings arrive intact, every client leg is MPTCP with two subflows, and
the checksum state of both legs is the one the setting asks for (read from
the client's kernel and from the proxy's log line); the namespace sysctl a
proxy holds is given back. The converter's default is tested one way at a
time: both ways at once it fails about once in 2,000 transfers, a kernel
fault a test of a dozen transfers would only show as a flake; the benchmark
(``benchmarks/integrity.py --bidirectional``) counts those rates.
"""

from __future__ import annotations

import os
import socket

import pytest

from mptcp_proxy.config import Endpoint, ForwardConfig, RelayConfig, UpstreamMode
from mptcp_proxy.config_app_proxy import AppProxyConfig
from mptcp_proxy.config_convert import ConvertConfig
from mptcp_proxy.convert_client import open_connection
from mptcp_proxy.kernel.checksum import CHECKSUM_SYSCTL
from mptcp_proxy.lab import Lab, PathSpec
from mptcp_proxy.lab.traffic import proxy_handshake, set_client_subflows
from mptcp_proxy.modes.app_proxy import HTTP_CONNECT, SOCKS5
from mptcp_proxy.modes.policy import parse_networks
from mptcp_proxy.observe.sockinfo import is_mptcp, mptcp_info
from mptcp_proxy.server.app_proxy import AppProxyServer
from mptcp_proxy.server.convert import ConvertServer
from mptcp_proxy.server.forward import ForwardServer
from tests.support.lab_env import conn_log, log_lines, relay_rest  # noqa: F401
from tests.support.servers import HashServer, ProxyRunner
from tests.support.traffic import IPPROTO_MPTCP, payload, sha256

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

SIZE = 512 * 1024
TRANSFERS = 12          # per mode; benchmarks/integrity.py runs >= 1,000
DOWN = payload(SIZE, 77)
MODES = ("forward", "convert", "socks5", "http-connect")
BIDIRECTIONAL, SEQUENTIAL = "both ways at once", "one way at a time"


@pytest.fixture(scope="module")
def lab():
    with Lab.create([PathSpec(rate_mbit=100), PathSpec(rate_mbit=100)]) as lab:
        set_client_subflows(lab, 2)
        with lab.server.enter():
            servers = {BIDIRECTIONAL: HashServer(lab.server_addr, mptcp=True,
                                                 reply_fn=lambda i: DOWN),
                       SEQUENTIAL: HashServer(lab.server_addr, mptcp=True,
                                              reply_fn=lambda i: DOWN, mode="after-eof")}
        try:
            yield lab, servers
        finally:
            for server in servers.values():
                server.close()


def start(lab: Lab, mode: str, target: tuple, dss_checksum: bool | None) -> ProxyRunner:
    k = lab.server_addr.split(".")[1]
    common = dict(listen=Endpoint(lab.paths[0].proxy_addr, 0), upstream=UpstreamMode.MPTCP,
                  relay=RelayConfig(connect_timeout=3))
    if dss_checksum is not None:   # None: the mode's default
        common["dss_checksum"] = dss_checksum
    allow = parse_networks([f"10.{k}.0.0/16"], "t")
    with lab.proxy.enter():
        if mode == "forward":
            server = ForwardServer(ForwardConfig(target=Endpoint(*target), **common)).start()
        elif mode == "convert":
            server = ConvertServer(ConvertConfig(allow_targets=allow, tfo_no_cookie=True,
                                                 **common)).start()
        else:
            protocol = SOCKS5 if mode == "socks5" else HTTP_CONNECT
            server = AppProxyServer(AppProxyConfig(protocol=protocol, allow_targets=allow,
                                                   **common)).start()
    return ProxyRunner(server, netns=lab.proxy.ns).start()


def open_client(lab: Lab, mode: str, proxy: tuple, target: tuple) -> socket.socket:
    """A client socket in the client ns, through ``mode``'s handshake, ready to relay."""
    with lab.client.enter():
        if mode == "convert":
            conn = open_connection(proxy, target, cache=None, tfo_no_cookie=True, timeout=10)
            sock = conn.sock
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
            sock.settimeout(10)
            sock.connect(proxy)
    if mode in ("socks5", "http-connect"):
        proxy_handshake(sock, mode, target)   # raises unless the proxy said yes
    sock.settimeout(30)
    return sock


def exchange(lab: Lab, mode: str, proxy: tuple, target: tuple, seed: int) -> dict:
    """One hashed transfer each way; what the client's kernel says of its socket."""
    up = payload(SIZE, seed)
    sock = open_client(lab, mode, proxy, target)
    with sock:
        down = relay_rest(sock, up)
        info = mptcp_info(sock)
        return {"up": sha256(up), "down_ok": down == DOWN, "down_len": len(down),
                "mptcp": is_mptcp(sock), "csum": bool(info and info.csum_enabled)}


def run_mode(lab: Lab, server: HashServer, mode: str, setting: bool | None, conn_log,
             dss_checksum: bool) -> None:
    """Transfers through ``mode`` started with ``setting`` (None: its default);
    ``dss_checksum``: whether both legs must then be checksummed."""
    for node in (lab.client, lab.server):
        assert node.sysctl(CHECKSUM_SYSCTL) == "0"   # the hosts do not ask
    before = lab.proxy.sysctl(CHECKSUM_SYSCTL)
    runner = start(lab, mode, server.addr, setting)
    try:
        assert lab.proxy.sysctl(CHECKSUM_SYSCTL) == ("1" if dss_checksum else before)
        first = len(server.received)
        results = [exchange(lab, mode, runner.addr, server.addr, seed=1000 + i)
                   for i in range(TRANSFERS)]
        sessions = runner.wait_closed(TRANSFERS)
        received = server.wait_received(first + TRANSFERS)[first:]
    finally:
        runner.stop()
    # Given back when the proxy stops.
    assert lab.proxy.sysctl(CHECKSUM_SYSCTL) == before
    # Every byte right, both ways: never a wrong hash, never retried.
    assert [r["down_len"] for r in results] == [SIZE] * TRANSFERS
    assert all(r["down_ok"] for r in results), "wrong bytes downloaded"
    expected = {r["up"]: i for i, r in enumerate(results)}
    wrong = [(h, n) for h, n in received if h not in expected]
    missing = sorted(i for h, i in expected.items() if h not in {h for h, _ in received})
    assert not wrong and not missing, f"wrong bytes uploaded: got {wrong}, missing {missing}"
    # Multipath, with the checksum state asked for, from the client's kernel...
    assert all(r["mptcp"] for r in results), "client leg fell back to TCP"
    assert [r["csum"] for r in results] == [dss_checksum] * TRANSFERS
    # ... and from the proxy's view of both legs (the log line's fields). The
    # subflow count is the most the proxy saw (they close with the
    # connection); a join now and then comes too late for the proxy's
    # samples, so "multipath" here means nearly every connection.
    subflows = [s.session.client_subflows for s in sessions]
    assert sum(n == 2 for n in subflows) >= TRANSFERS * 3 // 4, subflows
    assert all(s.session.client_csum is dss_checksum for s in sessions)
    assert all(s.session.upstream_csum is dss_checksum for s in sessions)
    assert all(s.session.upstream_mptcp for s in sessions)
    assert all(s.reason == "done" for s in sessions), [s.reason for s in sessions]
    flag = "yes" if dss_checksum else "no"
    assert len(log_lines(conn_log, f"mode={mode} ", f"client_csum={flag}",
                         f"upstream_csum={flag}")) == TRANSFERS


DEFAULT_CHECKSUM = {"forward": True, "convert": False, "socks5": True, "http-connect": True}


@pytest.mark.parametrize("mode", ("forward", "socks5", "http-connect"))
def test_multipath_transfers_both_ways_at_once_are_intact_by_default(lab, mode, conn_log):
    """The server sends while the client uploads: the pattern in which, without
    checksums, these modes delivered wrong bytes (6 of 3,400); with their
    default (checksums on), 0 of 2,400."""
    lab, servers = lab
    run_mode(lab, servers[BIDIRECTIONAL], mode, None, conn_log,
             dss_checksum=DEFAULT_CHECKSUM[mode])


@pytest.mark.parametrize("mode", MODES)
def test_multipath_transfers_one_way_at_a_time_are_intact_by_default(lab, mode, conn_log):
    """Upload, then download: the converter's own pattern with its default
    (checksums off; 0 of 600 wrong), and every other mode's."""
    lab, servers = lab
    run_mode(lab, servers[SEQUENTIAL], mode, None, conn_log,
             dss_checksum=DEFAULT_CHECKSUM[mode])


def test_dss_checksum_off_leaves_both_legs_unchecksummed(lab, conn_log):
    lab, servers = lab
    run_mode(lab, servers[SEQUENTIAL], "forward", False, conn_log, dss_checksum=False)
