"""A new user's first hour, as the README tells it: only the installed CLI, no venv on PATH.

``lab up --json`` prints the ``--allow-target`` options its addresses need;
``lab exec ... -- mptcp-proxy socks5 <those options>`` serves curl in the
client namespace a file from the server namespace; without the options the
same proxy refuses the target; ``lab down`` stops the proxy with SIGTERM (it
drains and reports) before removing the lab.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mptcp_proxy.lab import Lab, remove_lab

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is installed by make setup"),
]

CLI = str(Path(sys.executable).parent / "mptcp-proxy")
ENV = {**os.environ, "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
HTTP_PORT = 8080
SOCKS_PORT = 1080
SIZE = 1_000_000


def cli(*argv: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *argv], capture_output=True, text=True, timeout=60, env=ENV,
                          **kwargs)


def start_proxy(name: str, listen: str, *options: str) -> subprocess.Popen:
    proc = subprocess.Popen([CLI, "lab", "exec", name, "proxy", "--", "mptcp-proxy",
                             "socks5", "--listen", listen, *options],
                            stderr=subprocess.PIPE, text=True, env=ENV)
    line = proc.stderr.readline()
    while "listening on" not in line:
        assert line, f"the proxy exited {proc.wait(5)} before listening"
        line = proc.stderr.readline()
    return proc


def fetch(name: str, proxy: str, url: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([CLI, "lab", "exec", name, "client", "--", "curl", "-sS", "--fail",
                           "--max-time", "20", "--socks5", proxy, url],
                          capture_output=True, timeout=60, env=ENV)


def test_lab_up_hint_lets_socks5_reach_the_lab_server(tmp_path):
    name = f"mpx-t{secrets.token_hex(3)}"
    (tmp_path / "blob").write_bytes(blob := os.urandom(SIZE))
    procs: list[subprocess.Popen] = []
    try:
        up = cli("lab", "up", "--name", name, "--json")
        assert up.returncode == 0, up.stderr
        facts = json.loads(up.stdout)
        options = facts["proxy_options"]
        lab = Lab.attach(name)
        procs.append(lab.server.popen(
            [sys.executable, "-m", "http.server", "--bind", lab.server_addr, "--directory",
             str(tmp_path), str(HTTP_PORT)], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL))
        url = f"http://{lab.server_addr}:{HTTP_PORT}/blob"
        for _ in range(200):
            if lab.client.run(["curl", "-s", "-o", "/dev/null", url], check=False).returncode == 0:
                break
            time.sleep(0.05)

        # Without the hint: the lab server is a private target, refused.
        bare = start_proxy(name, f"{lab.paths[0].proxy_addr}:{SOCKS_PORT}")
        procs.append(bare)
        refused = fetch(name, f"{lab.paths[0].proxy_addr}:{SOCKS_PORT}", url)
        assert refused.returncode != 0
        bare.terminate()
        assert bare.wait(15) == 0
        assert "reason=refused:target-not-allowed" in bare.stderr.read()

        # With it: served, every byte intact.
        proxy = start_proxy(name, f"{lab.paths[0].proxy_addr}:{SOCKS_PORT + 1}", *options)
        procs.append(proxy)
        got = fetch(name, f"{lab.paths[0].proxy_addr}:{SOCKS_PORT + 1}", url)
        assert got.returncode == 0, got.stderr.decode()
        assert hashlib.sha256(got.stdout).digest() == hashlib.sha256(blob).digest()

        # lab down: the proxy gets SIGTERM, drains, reports, and its lab exec ends with it.
        down = cli("lab", "down", name)
        assert down.returncode == 0, down.stderr
        assert proxy.wait(15) == 0
        rest = proxy.stderr.read()
        assert "SIGTERM: stopping" in rest and "socks5: stopped; 1 connections relayed" in rest
    finally:
        for p in procs:
            p.kill()
            p.wait(5)
        remove_lab(name)
