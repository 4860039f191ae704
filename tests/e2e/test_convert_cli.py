"""The installed `mptcp-proxy convert` command, run in a lab's proxy namespace."""

from __future__ import annotations

import os
import re
import signal
import socket

import pytest

from mptcp_proxy.lab import Lab, PathSpec
from mptcp_proxy.wire.convert import ConvertErrorCode
from tests.support.convert_env import (
    DOWN, SERVER_PORT, ConvertEnv, expect_error, read_reply, request, tfo_send,
)
from tests.support.lab_env import recv_all, wait_for
from tests.support.proc import CliProcess
from tests.support.servers import HashServer
from tests.support.traffic import payload, sha256

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

PORT = 5124
TFO = "net.ipv4.tcp_fastopen"


@pytest.fixture(scope="module")
def env():
    with Lab.create(paths=[PathSpec()]) as lab:
        with lab.server.enter():
            tcp = HashServer(lab.server_addr, mptcp=False, port=SERVER_PORT,
                             reply_fn=lambda i: DOWN)
        try:
            yield ConvertEnv(lab, tcp, tcp)
        finally:
            tcp.close()


def start(env: ConvertEnv, *args: str, ready: str = "listening on") -> CliProcess:
    k = env.server_addr.split(".")[1]
    proc = CliProcess(["convert", "--listen", f"{env.proxy_addr}:{PORT}",
                       "--allow-target", f"10.{k}.254.0/24", *args],
                      prefix=["ip", "netns", "exec", env.lab.proxy.ns])
    proc.wait_for(ready)
    return proc


def converted(env: ConvertEnv, up: bytes, cookie: bytes | None = None) -> bytes:
    with env.client() as sock:
        tfo_send(sock, request(env.server_addr, SERVER_PORT, cookie=cookie) + up,
                 (env.proxy_addr, PORT))
        reply, leftover = read_reply(sock)
        assert reply.error is None, reply
        sock.shutdown(socket.SHUT_WR)
        return leftover + recv_all(sock)


def test_tfo_conversion_log_line_and_sysctls_restored(env):
    before = env.lab.proxy.sysctl(TFO)
    proc = start(env, "--tfo-no-cookie")
    try:
        assert int(env.lab.proxy.sysctl(TFO)) & 0x3 == 0x3
        up = payload(500_000, 1)
        assert converted(env, up) == DOWN
        wait_for(lambda: (sha256(up), len(up)) in env.tcp_server.received, what="upload")
        out = proc.wait_for("reason=done")
        line = next(l for l in out.splitlines() if " conn=" in l)
        assert "mode=convert" in line and "tfo=yes" in line and "convert=connect" in line
        assert f"target={env.server_addr}:{SERVER_PORT}" in line
        assert f"bytes_up={len(up)}" in line and "client_side=mptcp" in line
        assert "TFO queue 1024, no TFO cookie needed" in out
    finally:
        proc.signal(signal.SIGTERM)
        rc = proc.wait()
    assert rc == 0, proc.output
    assert env.lab.proxy.sysctl(TFO) == before
    assert "1 with the Convert header in the SYN" in proc.output


def test_cookie_secret_file(env, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"e2e-secret-0123456789abcdef\n")
    secret.chmod(0o600)
    proc = start(env, "--tfo-no-cookie", "--cookie-secret", str(secret))
    try:
        with env.client() as sock:
            tfo_send(sock, request(env.server_addr, SERVER_PORT), (env.proxy_addr, PORT))
            cookie = expect_error(sock, ConvertErrorCode.MISSING_COOKIE).cookie
        assert converted(env, b"with a cookie", cookie=cookie) == DOWN
        out = proc.wait_for("reason=done")
        assert "reason=missing-cookie" in out and "convert=error:3" in out
        assert "cookies required" in out
    finally:
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0


def test_workers_share_the_port_the_parent_owns_the_sysctls(env):
    before = env.lab.proxy.sysctl(TFO)
    proc = start(env, "--tfo-no-cookie", "--workers", "2", ready="convert[1]: listening on")
    try:
        proc.wait_for("convert[0]: listening on")
        assert int(env.lab.proxy.sysctl(TFO)) & 0x3 == 0x3
        for i in range(6):
            assert converted(env, payload(1000, i)) == DOWN
        out = proc.wait_for("reason=done")
        assert len(set(re.findall(r"worker \d started \(pid (\d+)\)", out))) == 2
    finally:
        proc.signal(signal.SIGTERM)
        rc = proc.wait(15)
    assert rc == 0, proc.output
    assert env.lab.proxy.sysctl(TFO) == before


def _secret(tmp_path, content: bytes, mode: int) -> str:
    path = tmp_path / "secret"
    path.write_bytes(content)
    path.chmod(mode)
    return str(path)


@pytest.mark.parametrize("args, key", [
    (["--allow", "not-a-network"], "--allow"),
    (["--allow-target", "10.0.0.0/40"], "--allow-target"),
    (["--deny-target", "x"], "--deny-target"),
    (["--handshake-timeout", "0"], "--handshake-timeout"),
    (["--tfo-queue", "-1"], "--tfo-queue"),
    (["--error-burst", "0"], "--error-burst"),
    (["--cookie-secret", "/nonexistent/secret"], "--cookie-secret"),
    (["--upstream", "quic"], "--upstream"),
    (["--listen", "nohostport"], "--listen"),
])
def test_bad_configuration_is_one_clear_line_and_exit_2(args, key):
    if "--listen" not in args:
        args = ["--listen", "127.0.0.1:0", *args]
    proc = CliProcess(["convert", *args])
    assert proc.wait(10) == 2
    assert "configuration error" in proc.output and key in proc.output
    assert "Traceback" not in proc.output


@pytest.mark.parametrize("content, mode, why", [
    (b"short", 0o600, "at least 16"),
    (b"a-long-enough-secret-but-shared", 0o644, "readable by others"),
    (b"", 0o600, "at least 16"),
])
def test_bad_cookie_secret_files(tmp_path, content, mode, why):
    proc = CliProcess(["convert", "--listen", "127.0.0.1:0",
                       "--cookie-secret", _secret(tmp_path, content, mode)])
    assert proc.wait(10) == 2
    assert why in proc.output and "Traceback" not in proc.output


def test_convert_is_listed_in_help():
    proc = CliProcess(["--help"])
    assert proc.wait(10) == 0
    assert "convert" in proc.output and "RFC 8803" in proc.output
