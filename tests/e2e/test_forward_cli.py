"""The installed `mptcp-proxy forward` command: logs, signals, errors, fd exhaustion."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time

import pytest

from tests.support.proc import CliProcess, free_port
from tests.support.servers import HashServer
from tests.support.traffic import (
    connect, payload, recv_until_eof, send_all_and_shut, sha256,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def server():
    srv = HashServer(mptcp=False, reply_fn=lambda i: payload(50_000, 9))
    yield srv
    srv.close()


def start_forward(target, *extra: str, prefix=None) -> tuple[CliProcess, tuple]:
    port = free_port()
    proc = CliProcess(["forward", "--listen", f"127.0.0.1:{port}",
                       "--to", f"{target[0]}:{target[1]}", *extra], prefix=prefix)
    proc.wait_for("listening on")
    return proc, ("127.0.0.1", port)


def test_one_log_line_per_connection_with_sides_bytes_and_reason(server):
    proc, addr = start_forward(server.addr)
    try:
        up = payload(123_456, 3)
        with connect(addr, mptcp=True) as c:
            send_all_and_shut(c, up)
            assert recv_until_eof(c) == (sha256(payload(50_000, 9)), 50_000)
        out = proc.wait_for("reason=done")
        lines = [l for l in out.splitlines() if " conn=" in l]
        assert len(lines) == 1
        line = lines[0]
        assert "client_side=mptcp" in line
        assert "upstream_side=fallback" in line  # auto: MPTCP asked, TCP server
        assert "bytes_up=123456" in line and "bytes_down=50000" in line
        assert re.search(r"duration=\d+\.\d+s", line)
        assert f"target={server.addr[0]}:{server.addr[1]}" in line
    finally:
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0


def test_sigterm_drains_open_connection_then_exits(server):
    proc, addr = start_forward(server.addr, "--drain-timeout", "10")
    try:
        c = connect(addr, mptcp=True)
        c.sendall(b"first part ")
        time.sleep(0.3)
        proc.signal(signal.SIGTERM)
        proc.wait_for("draining 1 connections")
        time.sleep(0.3)
        assert proc.proc.poll() is None, "proxy exited while a connection was open"
        # The open connection keeps working during the drain ...
        send_all_and_shut(c, b"second part")
        assert recv_until_eof(c) == (sha256(payload(50_000, 9)), 50_000)
        c.close()
        # ... and once it is done the proxy stops by itself.
        assert proc.wait(10) == 0
        assert server.wait_received(1) == [(sha256(b"first part second part"), 22)]
    finally:
        proc.kill()


def test_second_signal_stops_immediately(server):
    proc, addr = start_forward(server.addr, "--drain-timeout", "60")
    try:
        c = connect(addr, mptcp=True)
        c.sendall(b"x")
        time.sleep(0.2)
        proc.signal(signal.SIGINT)
        proc.wait_for("draining")
        start = time.monotonic()
        proc.signal(signal.SIGINT)
        assert proc.wait(5) == 0
        assert time.monotonic() - start < 3
        c.close()
    finally:
        proc.kill()


@pytest.mark.parametrize("args, key", [
    (["--listen", "127.0.0.1:0", "--to", "nohostport"], "--to"),
    (["--listen", "127.0.0.1:0", "--to", "127.0.0.1:99999"], "--to"),
    (["--listen", "127.0.0.1:0", "--to", "127.0.0.1:80", "--upstream", "quic"], "--upstream"),
    (["--listen", "127.0.0.1:0", "--to", "no-such-host.invalid:80"], "--to"),
    (["--listen", "127.0.0.1:0", "--to", "127.0.0.1:80", "--pipe-size", "10"], "pipe-size"),
])
def test_bad_configuration_is_one_clear_line_and_exit_2(args, key):
    proc = CliProcess(["forward", *args])
    assert proc.wait(10) == 2
    assert "configuration error" in proc.output and key in proc.output
    assert "Traceback" not in proc.output


def test_listen_address_in_use_is_a_clear_error(server):
    proc = CliProcess(["forward", "--listen", f"{server.addr[0]}:{server.addr[1]}",
                       "--to", "127.0.0.1:9"])
    assert proc.wait(10) == 2
    assert "cannot listen" in proc.output and "Traceback" not in proc.output


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) missing")
@pytest.mark.parametrize("nofile", [64, 65])   # either fd parity: accept() or socket() fails
def test_fd_exhaustion_pauses_accepting_without_spinning_then_recovers(server, nofile):
    """``nofile`` fds, 60 client connections: accept() or the upstream socket()
    hits EMFILE. The proxy must neither die nor spin, and must serve again once
    connections close. A client accepted when no fd is left for its upstream
    is reset (logged ``upstream-resources``), at most one per pause; the
    others wait in the backlog."""
    proc, addr = start_forward(server.addr, "--max-connections", "1000",
                               prefix=["prlimit", f"--nofile={nofile}:{nofile}"])
    clients = []
    try:
        for _ in range(60):
            clients.append(connect(addr, mptcp=True))
        proc.wait_for("pausing accepts")
        cpu_before = proc.cpu_seconds()
        time.sleep(2.0)
        assert proc.cpu_seconds() - cpu_before < 0.5, "proxy spins while out of fds"
        assert proc.proc.poll() is None
        # Every client refused for want of an upstream fd paused accepting:
        # one reset per pause, not the whole backlog at once.
        refused = proc.output.count("reason=upstream-resources")
        assert refused <= proc.output.count("pausing accepts"), proc.output
        for c in clients:
            c.close()
        clients.clear()
        time.sleep(0.5)
        with connect(addr, mptcp=True) as c:
            send_all_and_shut(c, b"after recovery")
            assert recv_until_eof(c) == (sha256(payload(50_000, 9)), 50_000)
    finally:
        for c in clients:
            c.close()
        proc.signal(signal.SIGTERM)
        proc.wait(15)
        proc.kill()


def start_two_workers(server) -> tuple[CliProcess, int]:
    """``forward --workers 2`` on a fixed port, once both workers listen."""
    port = free_port()
    proc = CliProcess(["forward", "--listen", f"127.0.0.1:{port}", "--to",
                       f"{server.addr[0]}:{server.addr[1]}", "--workers", "2"])
    try:
        proc.wait_for("forward[1]: listening on")
        proc.wait_for("forward[0]: listening on")
    except BaseException:
        proc.kill()
        raise
    return proc, port


def test_workers_share_the_port_and_stop_together(server):
    proc, port = start_two_workers(server)
    try:
        for i in range(20):
            with connect(("127.0.0.1", port), mptcp=True) as c:
                send_all_and_shut(c, payload(1000, i))
                assert recv_until_eof(c) == (sha256(payload(50_000, 9)), 50_000)
        out = proc.wait_for("reason=done")
        pids = set(re.findall(r"worker \d started \(pid (\d+)\)", out))
        assert len(pids) == 2
    finally:
        proc.signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert proc.output.count("stopped; ") == 2


def test_workers_need_a_fixed_port(server):
    proc = CliProcess(["forward", "--listen", "127.0.0.1:0", "--to",
                       f"{server.addr[0]}:{server.addr[1]}", "--workers", "2"])
    assert proc.wait(10) == 2 and "--workers" in proc.output


def test_workers_stop_when_the_supervisor_is_killed(server):
    """PR_SET_PDEATHSIG: no orphaned workers serving without their supervisor."""
    proc, _ = start_two_workers(server)
    try:
        pids = [int(p) for p in re.findall(r"worker \d started \(pid (\d+)\)", proc.output)]
        assert len(pids) == 2
    finally:
        proc.signal(signal.SIGKILL)
        proc.wait(15)
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if os.path.exists(f"/proc/{p}")
                 and open(f"/proc/{p}/stat").read().split(") ")[1][0] != "Z"]
        time.sleep(0.05)
    assert alive == [], f"workers {alive} outlived their supervisor"
