"""Recorded sysctl changes are restored, in a namespace of the test's own."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from mptcp_proxy.errors import KernelError
from mptcp_proxy.kernel.sysctl import SysctlChanges, read_sysctl, sysctl_path
from mptcp_proxy.lab import netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture
def ns():
    name = f"mpx-sysctl-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_changes_are_restored_in_reverse_order(ns):
    with netns.enter(ns):
        before_join = read_sysctl("net.mptcp.allow_join_initial_addr_port")
        before_tfo = read_sysctl("net.ipv4.tcp_fastopen")
        with SysctlChanges() as changes:
            changes.set("net.mptcp.allow_join_initial_addr_port", 0)
            changes.set_bits("net.ipv4.tcp_fastopen", 0x3)
            changes.set("net.ipv4.tcp_fastopen", int(read_sysctl("net.ipv4.tcp_fastopen")) | 0x200)
            assert read_sysctl("net.mptcp.allow_join_initial_addr_port") == "0"
            assert int(read_sysctl("net.ipv4.tcp_fastopen")) & 0x203 == 0x203
        assert read_sysctl("net.mptcp.allow_join_initial_addr_port") == before_join
        assert read_sysctl("net.ipv4.tcp_fastopen") == before_tfo


def test_unchanged_value_is_not_recorded(ns):
    with netns.enter(ns):
        changes = SysctlChanges()
        current = read_sysctl("net.mptcp.enabled")
        changes.set("net.mptcp.enabled", current)
        assert changes.changed == []


def test_bad_names_and_missing_keys_are_kernel_errors():
    with pytest.raises(KernelError):
        sysctl_path("../../etc/passwd")
    with pytest.raises(KernelError):
        read_sysctl("net.no.such.key")
