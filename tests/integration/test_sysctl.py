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


# --------------------------------------------------------------------------
# SharedSysctlBits: several holders in one namespace, and holders that die
# --------------------------------------------------------------------------

TFO = "net.ipv4.tcp_fastopen"


def test_shared_bits_stay_until_the_last_holder_releases(ns, tmp_path):
    from mptcp_proxy.kernel.sysctl import SharedSysctlBits

    with netns.enter(ns):
        original = read_sysctl(TFO)
        a = SharedSysctlBits(TFO, 0x3, state_dir=tmp_path)
        b = SharedSysctlBits(TFO, 0x202, state_dir=tmp_path)
        a.acquire()
        assert int(read_sysctl(TFO)) & 0x3 == 0x3
        b.acquire()
        assert int(read_sysctl(TFO)) & 0x203 == 0x203
        a.release()
        assert int(read_sysctl(TFO)) & 0x203 == 0x203   # b still needs them
        a.release()                                      # idempotent
        b.release()
        assert read_sysctl(TFO) == original
        assert list(tmp_path.glob("*.json")) == []


def test_plain_save_and_restore_would_pull_the_bits_from_under_another_user(ns):
    """Why SharedSysctlBits exists: with SysctlChanges, the second user records
    nothing, and the first to exit restores the old value under it."""
    with netns.enter(ns):
        first, second = SysctlChanges(), SysctlChanges()
        first.set_bits(TFO, 0x3)
        second.set_bits(TFO, 0x3)
        first.restore()
        assert int(read_sysctl(TFO)) & 0x3 != 0x3
        second.restore()


def test_a_holder_that_was_killed_is_recovered_from(ns, tmp_path):
    import sys
    import textwrap

    with netns.enter(ns):
        original = read_sysctl(TFO)
    script = textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        from mptcp_proxy.kernel.sysctl import SharedSysctlBits
        SharedSysctlBits({TFO!r}, 0x202, state_dir=Path({str(tmp_path)!r})).acquire()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", script])
    assert proc.returncode == -9
    with netns.enter(ns):
        assert int(read_sysctl(TFO)) & 0x202 == 0x202     # left behind by the dead holder
        from mptcp_proxy.kernel.sysctl import SharedSysctlBits
        fresh = SharedSysctlBits(TFO, 0x2, state_dir=tmp_path)
        fresh.acquire()
        assert fresh.recovered
        assert int(read_sysctl(TFO)) == int(original) | 0x2   # the dead one's 0x200 is gone
        fresh.release()
        assert read_sysctl(TFO) == original


def test_a_value_changed_by_someone_else_is_left_alone(ns, tmp_path):
    from mptcp_proxy.kernel.sysctl import SharedSysctlBits

    with netns.enter(ns):
        holder = SharedSysctlBits(TFO, 0x2, state_dir=tmp_path)
        holder.acquire()
        subprocess.run(["sysctl", "-qw", f"{TFO}=1027"], check=True)  # an administrator
        holder.release()
        assert read_sysctl(TFO) == "1027"


def test_namespaces_keep_separate_records(ns, tmp_path):
    from mptcp_proxy.kernel.sysctl import SharedSysctlBits

    other = f"{ns}-b"
    subprocess.run(["ip", "netns", "add", other], check=True)
    try:
        with netns.enter(ns):
            a = SharedSysctlBits(TFO, 0x2, state_dir=tmp_path)
            a.acquire()
        with netns.enter(other):
            before = read_sysctl(TFO)
            b = SharedSysctlBits(TFO, 0x2, state_dir=tmp_path)
            b.acquire()
            b.release()
            assert read_sysctl(TFO) == before
        with netns.enter(ns):
            assert int(read_sysctl(TFO)) & 0x2
            a.release()
        assert len(list(tmp_path.glob("*.json"))) == 0
    finally:
        subprocess.run(["ip", "netns", "del", other], check=False)


def test_an_unwritable_record_directory_is_a_kernel_error(ns, tmp_path):
    from mptcp_proxy.kernel.sysctl import SharedSysctlBits

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with netns.enter(ns):
        before = read_sysctl(TFO)
        holder = SharedSysctlBits(TFO, 0x2, state_dir=blocker / "sub")
        with pytest.raises(KernelError, match="cannot record"):
            holder.acquire()
        assert read_sysctl(TFO) == before and not holder.held


def test_records_of_namespaces_that_are_gone_are_removed(ns, tmp_path):
    from mptcp_proxy.kernel.sysctl import SharedSysctlBits

    stale = tmp_path / f"{2**40 + 7}-{TFO}.json"   # an inode no namespace has
    stale.write_text('{"original": "1", "set": "3", "holders": ["1:0:x"]}\n')
    with netns.enter(ns):
        holder = SharedSysctlBits(TFO, 0x2, state_dir=tmp_path)
        holder.acquire()
        assert not stale.exists()
        assert len(list(tmp_path.glob("*.json"))) == 1   # its own
        holder.release()


def test_a_holder_releases_in_its_own_namespace_whichever_thread_releases(ns, tmp_path):
    """A server started in a lab namespace may be stopped from a thread in
    another one: the value must be restored where it was set, and the other
    namespace left untouched."""
    from mptcp_proxy.kernel.sysctl import SharedSysctlBits

    other = f"{ns}-b"
    subprocess.run(["ip", "netns", "add", other], check=True)
    try:
        with netns.enter(ns):
            original = read_sysctl(TFO)
            holder = SharedSysctlBits(TFO, 0x200, state_dir=tmp_path)
            holder.acquire()
        with netns.enter(other):
            before_other = read_sysctl(TFO)
            holder.release()
            assert read_sysctl(TFO) == before_other
        with netns.enter(ns):
            assert read_sysctl(TFO) == original
    finally:
        subprocess.run(["ip", "netns", "del", other], check=False)


# --------------------------------------------------------------------------
# DSS checksums: net.mptcp.checksum_enabled held like the TFO bits
# --------------------------------------------------------------------------

CSUM = "net.mptcp.checksum_enabled"


def test_dss_checksum_is_held_and_given_back(ns, tmp_path):
    from mptcp_proxy.kernel.checksum import checksum_enabled, hold_dss_checksum

    with netns.enter(ns):
        assert read_sysctl(CSUM) == "0"
        assert checksum_enabled() is False
        first = hold_dss_checksum(state_dir=tmp_path)
        second = hold_dss_checksum(state_dir=tmp_path)
        assert read_sysctl(CSUM) == "1" and checksum_enabled() is True
        first.release()
        assert read_sysctl(CSUM) == "1"        # the second user still needs it
        second.release()
        assert read_sysctl(CSUM) == "0"


def test_dss_checksum_left_by_a_killed_proxy_is_restored_on_the_next_start(ns, tmp_path):
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from mptcp_proxy.kernel.checksum import hold_dss_checksum
        hold_dss_checksum(state_dir=Path({str(tmp_path)!r}))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", script])
    assert proc.returncode == -9
    with netns.enter(ns):
        assert read_sysctl(CSUM) == "1"        # left behind by the dead holder
        from mptcp_proxy.kernel.checksum import hold_dss_checksum
        fresh = hold_dss_checksum(state_dir=tmp_path)
        assert fresh is not None and fresh.recovered
        assert read_sysctl(CSUM) == "1"
        fresh.release()
        assert read_sysctl(CSUM) == "0"        # the original, not the dead one's value


def test_dss_checksum_that_cannot_be_recorded_says_what_to_do(ns, tmp_path):
    from mptcp_proxy.kernel.checksum import hold_dss_checksum

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with netns.enter(ns):
        with pytest.raises(KernelError, match="--dss-checksum off"):
            hold_dss_checksum(state_dir=blocker / "sub")
        assert read_sysctl(CSUM) == "0"
        # Already on (set by an administrator): the proxy runs with it as it is.
        subprocess.run(["sysctl", "-qw", f"{CSUM}=1"], check=True)
        assert hold_dss_checksum(state_dir=blocker / "sub") is None
        assert read_sysctl(CSUM) == "1"
