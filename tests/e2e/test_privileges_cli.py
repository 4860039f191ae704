"""The installed CLI without privileges, and with wrong addresses: one line, nothing changed.

Each test runs the real ``mptcp-proxy`` in a network namespace of its own
(``ip netns exec``), as user nobody without capabilities (``setpriv``), and
compares the namespace's kernel state (nftables, policy rules, sysctls, MPTCP
endpoints and limits, the shared-sysctl records) before and after.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mptcp_proxy.kernel.sysctl import SHARED_STATE_DIR
from mptcp_proxy.lab import netns
from tests.support.bare_ns import bare_namespace
from tests.support.proc import CLI

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) missing"),
]

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
SYSCTLS = ("net.ipv4.tcp_fastopen", "net.mptcp.allow_join_initial_addr_port",
           "net.mptcp.checksum_enabled")


@pytest.fixture
def ns():
    with bare_namespace("priv") as name:
        yield name


def run(ns: str, *args: str, user: list[str] = NOBODY, timeout: float = 20
        ) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *user, CLI, *args],
                          capture_output=True, text=True, timeout=timeout)


def state(ns: str) -> dict[str, str]:
    """What a proxy may change in ``ns``, as text."""
    def out(*argv: str) -> str:
        return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True,
                              text=True, check=True).stdout
    inode = os.stat(f"/run/netns/{ns}").st_ino
    records = sorted(p.name for p in Path(SHARED_STATE_DIR).glob(f"{inode}-*"))
    return {
        "nft": out("nft", "list", "ruleset"),
        "rules4": out("ip", "-4", "rule"), "rules6": out("ip", "-6", "rule"),
        "endpoints": out("ip", "mptcp", "endpoint", "show"),
        "limits": out("ip", "mptcp", "limits", "show"),
        **{key: out("sysctl", "-n", key) for key in SYSCTLS},
        "records": " ".join(records),
    }


def one_line(result: subprocess.CompletedProcess) -> str:
    """The process failed with exactly one line on stderr (and nothing else)."""
    assert result.returncode != 0, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    return lines[0]


def test_transparent_without_privileges_says_what_it_needs_and_changes_nothing(ns):
    before = state(ns)
    line = one_line(run(ns, "transparent", "--ports", "80"))
    assert line.startswith("mptcp-proxy: transparent needs CAP_NET_ADMIN (for its nftables "
                           "table, policy routing, MPTCP path-manager endpoints, the C-bit "
                           "sysctl and its IP_TRANSPARENT listener): run it as root")
    assert line.endswith("nothing was changed")
    assert "restored" not in line and "Operation not permitted" not in line
    assert state(ns) == before


def test_convert_without_privileges_points_at_no_sysctl(ns):
    before = state(ns)
    line = one_line(run(ns, "convert", "--listen", "127.0.0.1:5124"))
    assert "net.ipv4.tcp_fastopen" in line and "CAP_NET_ADMIN" in line
    assert "run as root, or set net.ipv4.tcp_fastopen=" in line
    assert "yourself and pass --no-sysctl; nothing was changed" in line
    assert "cannot record" not in line
    assert state(ns) == before


def test_convert_with_no_sysctl_needs_no_privileges(ns):
    before = state(ns)
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *NOBODY, CLI, "convert", "--listen",
                             "127.0.0.1:5124", "--no-sysctl"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and proc.poll() is None:
            if subprocess.run(["ip", "netns", "exec", ns, "ss", "-Hltn", "sport", "= :5124"],
                              capture_output=True, text=True).stdout.strip():
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "listening on 127.0.0.1:5124" in err
    assert state(ns) == before


def test_client_agent_without_privileges(ns):
    before = state(ns)
    line = one_line(run(ns, "client", "--converter", "127.0.0.1:5124",
                        "--capture", "192.0.2.0/24:80"))
    assert line.startswith("mptcp-proxy: the client agent needs CAP_NET_ADMIN (for its "
                           "nftables capture table")
    assert line.endswith("nothing was changed")
    assert state(ns) == before


def test_a_low_port_without_privileges_names_the_capability(ns):
    line = one_line(run(ns, "forward", "--listen", "127.0.0.1:80", "--to", "127.0.0.1:9",
                        "--dss-checksum", "off"))
    assert "cannot listen on 127.0.0.1:80: Permission denied" in line
    assert "ports below 1024 need CAP_NET_BIND_SERVICE" in line


def test_announcing_an_address_of_another_host_fails_before_any_change(ns):
    """Issue: `--announce 198.51.100.1:7002` failed with `create listen socket
    error: -99` after the proxy had installed (and then removed) its state."""
    subprocess.run(["ip", "-n", ns, "link", "add", "up0", "type", "veth", "peer", "name",
                    "up1"], check=True)        # (no dummy module on these machines)
    subprocess.run(["ip", "-n", ns, "link", "set", "up0", "up"], check=True)
    subprocess.run(["ip", "-n", ns, "addr", "add", "192.0.2.1/24", "dev", "up0"], check=True)
    before = state(ns)
    result = run(ns, "transparent", "--ports", "80", "--announce", "198.51.100.1:7002",
                 user=[])
    line = one_line(result)
    assert result.returncode == 2
    assert line == ("mptcp-proxy: configuration error: --announce: 198.51.100.1 is not an "
                    "address of this host: announce one of the proxy host's own addresses, "
                    "the one the clients' other paths reach it at (they join it there); "
                    "this host has 192.0.2.1")
    assert state(ns) == before


def test_quiet_after_the_subcommand_hides_the_connection_lines(ns):
    for where, expect_quiet in (([], False), (["-q"], True)):
        proc = subprocess.Popen(["ip", "netns", "exec", ns, CLI, "forward", "--listen",
                                 "127.0.0.1:8080", "--to", "127.0.0.1:9",
                                 "--dss-checksum", "off", *where],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                r = subprocess.run(["ip", "netns", "exec", ns, "python3", "-c",
                                    "import socket; s=socket.create_connection(('127.0.0.1',"
                                    " 8080)); s.recv(1)"], capture_output=True)
                if r.returncode == 0:
                    break
                time.sleep(0.1)
            time.sleep(0.3)
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert out == ""                                   # logs go to stderr
        assert ("reason=upstream-refused" in err) is not expect_quiet, err
        assert ("listening on" in err) is not expect_quiet, err
