"""The installed `mptcp-proxy socks5` and `http-connect` commands, used by curl.

curl in the lab's client namespace fetches a random file from an HTTP server
in the server namespace through each proxy (SOCKS5 with the name resolved by
the proxy, HTTP CONNECT with --proxytunnel); the file's SHA-256 must match.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from mptcp_proxy.lab import Lab, PathSpec
from tests.support.proc import CliProcess

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is installed by make setup"),
]

HTTP_PORT = 8080
SIZE = 3_000_000


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    blob = os.urandom(SIZE)
    (root / "blob").write_bytes(blob)
    with Lab.create(paths=[PathSpec(), PathSpec()]) as lab:
        # The lab's server namespace runs plain TCP for everything started there.
        server = lab.server.popen([sys.executable, "-m", "http.server", "--bind",
                                   lab.server_addr, "--directory", str(root), str(HTTP_PORT)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            lab.blob_sha = hashlib.sha256(blob).hexdigest()  # type: ignore[attr-defined]
            _wait_http(lab)
            yield lab
        finally:
            server.kill()
            server.wait(5)


def _wait_http(lab: Lab) -> None:
    for _ in range(100):
        r = lab.client.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                            f"http://{lab.server_addr}:{HTTP_PORT}/blob"], check=False)
        if r.stdout.strip() == "200":
            return
        time.sleep(0.05)
    raise TimeoutError("HTTP server did not start")


def start(lab: Lab, command: str, port: int, *args: str) -> CliProcess:
    k = lab.server_addr.split(".")[1]
    proc = CliProcess([command, "--listen", f"{lab.paths[0].proxy_addr}:{port}",
                       "--allow-target", f"10.{k}.254.0/24", *args],
                      prefix=["ip", "netns", "exec", lab.proxy.ns])
    proc.wait_for("listening on")
    return proc


def fetch_sha(lab: Lab, *curl_args: str) -> str:
    proc = subprocess.run(["ip", "netns", "exec", lab.client.ns, "curl", "-sS", "--fail",
                           *curl_args, f"http://{lab.server_addr}:{HTTP_PORT}/blob"],
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(proc.stdout) == SIZE
    return hashlib.sha256(proc.stdout).hexdigest()


def test_curl_through_socks5(lab):
    proc = start(lab, "socks5", 1080)
    try:
        proxy = f"{lab.paths[0].proxy_addr}:1080"
        assert fetch_sha(lab, "--socks5", proxy) == lab.blob_sha
        out = proc.wait_for("reason=done")
        line = next(l for l in out.splitlines() if " conn=" in l)
        assert "mode=socks5" in line and f"target={lab.server_addr}:{HTTP_PORT}" in line
        down = int(line.split("bytes_down=")[1].split()[0])
        assert down > SIZE  # the HTTP response: headers + the file, no SOCKS reply
        # A refused request: a port the proxy does not serve.
        r = lab.client.run(["curl", "-sS", "--socks5", proxy,
                            f"http://{lab.server_addr}:9/"], check=False)
        assert r.returncode != 0
        proc.wait_for("reason=upstream-refused")
    finally:
        proc.signal(signal.SIGTERM)
        rc = proc.wait()
    assert rc == 0, proc.output
    assert "socks5: stopped; 1 connections relayed, 1 refused" in proc.output


def test_curl_through_http_connect_with_auth(lab, tmp_path):
    users = tmp_path / "users"
    users.write_text("alice:open sesame\n")
    users.chmod(0o600)
    proc = start(lab, "http-connect", 3128, "--auth", str(users), "--allow-port",
                 f"443,{HTTP_PORT}")
    try:
        proxy = f"http://{lab.paths[0].proxy_addr}:3128"
        assert fetch_sha(lab, "--proxytunnel", "-x", proxy, "--proxy-user",
                         "alice:open sesame") == lab.blob_sha
        out = proc.wait_for("reason=done")
        assert "user=alice" in out and "mode=http-connect" in out
        r = lab.client.run(["curl", "-sS", "--proxytunnel", "-x", proxy,
                            f"http://{lab.server_addr}:{HTTP_PORT}/blob"], check=False)
        assert r.returncode != 0 and "407" in r.stderr, r.stderr
        proc.wait_for("reason=http-error:407")
    finally:
        proc.signal(signal.SIGTERM)
        rc = proc.wait()
    assert rc == 0, proc.output


def test_bad_options_are_one_clear_line(lab, tmp_path):
    users = tmp_path / "users"
    users.write_text("alice:x\n")
    users.chmod(0o644)
    for args, needle in ((["--auth", str(users)], "chmod 600"),
                         (["--allow-port", "0-10"], "--allow-port"),
                         (["--allow", "nonsense"], "--allow")):
        proc = CliProcess(["socks5", "--listen", "127.0.0.1:0", *args])
        rc = proc.wait()
        assert rc == 2, proc.output
        assert needle in proc.output
